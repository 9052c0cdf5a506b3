"""Adapter math as plain ``nn.Module``s, called from ``call_module`` nodes the passes insert."""

from graphadapt.modules.bottleneck import (BottleneckAdapter, adapterhub_key_map, kwargs_from_adapterhub_config,
                                           load_adapterhub_state_dict)
from graphadapt.modules.lora import LoRAGate, LoRAModule
from graphadapt.modules.phm import PHMConfig, PHMLinear, init_shared_phm_parameters

__all__ = ["BottleneckAdapter", "LoRAGate", "LoRAModule", "PHMConfig", "PHMLinear", "adapterhub_key_map",
           "init_shared_phm_parameters", "kwargs_from_adapterhub_config", "load_adapterhub_state_dict"]
