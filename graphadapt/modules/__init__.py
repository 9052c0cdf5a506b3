"""Adapter math as plain ``nn.Module``s, called from ``call_module`` nodes the passes insert."""

from graphadapt.modules.lora import LoRAGate, LoRAModule
