"""Writes topics_train.jsonl / topics_test.jsonl: short English sentences about four topics.

Generated once from templates (seeded) and committed; rerun to reproduce the files byte for byte:
``python examples/data/make_topics.py``. The test split uses templates *and* subject words that
never occur in the training split, so test accuracy measures generalisation, not recall.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

LABELS = ["sports", "food", "technology", "weather"]

# (train words, test words) per topic; a sentence fills its template's {x} with one of them
WORDS = {
    "sports": (["the striker", "our goalkeeper", "the tennis champion", "the home team", "the marathon runner",
                "the coach", "the rugby squad", "the cyclist"],
               ["the boxer", "the swimmer", "the basketball team", "the sprinter", "the hockey captain", "the golfer"]),
    "food": (["the soup", "this pasta", "the chocolate cake", "the grilled fish", "our bakery's bread",
              "the curry", "the salad", "the pancakes"],
             ["the lasagna", "the dumplings", "this pizza", "the roast chicken", "the apple pie", "the noodle soup"]),
    "technology": (["the new phone", "the laptop", "this software update", "the graphics card", "the web browser",
                    "the smartwatch", "the database server", "the operating system"],
                   ["the tablet", "the compiler", "the router", "this app", "the hard drive", "the camera sensor"]),
    "weather": (["the storm", "the morning fog", "a cold front", "the heatwave", "heavy rain", "the wind",
                 "the snowfall", "a thunderstorm"],
                ["the hurricane", "the drizzle", "the frost", "a blizzard", "the monsoon", "a hailstorm"]),
}
TEMPLATES = {
    "sports": (["{x} won the match in the final minute", "{x} trained hard before the championship",
                "fans cheered as {x} scored again", "{x} lost the game after a penalty",
                "{x} broke the record at the stadium", "everyone is talking about {x} after the tournament"],
               ["{x} qualified for the olympic final", "the referee sent off {x} in the second half",
                "{x} signed a contract with a new club", "the crowd applauded {x} after the race"]),
    "food": (["{x} tasted delicious with fresh herbs", "{x} was too salty for my taste",
              "the chef served {x} with a spicy sauce", "i cooked {x} for dinner tonight",
              "{x} needs more garlic and butter", "the recipe for {x} takes an hour in the oven"],
             ["we ordered {x} at the restaurant", "{x} came out of the kitchen steaming hot",
              "my grandmother's recipe for {x} uses fresh cream", "{x} was sweet and crunchy"]),
    "technology": (["{x} crashed after installing the patch", "{x} runs much faster with more memory",
                    "engineers released {x} with new features", "{x} needs a firmware upgrade",
                    "the battery of {x} drains too quickly", "developers fixed a security bug in {x}"],
                   ["{x} would not connect to the network", "the latest version of {x} supports encryption",
                    "{x} froze while the processor overheated", "the manufacturer recalled {x} because of a faulty chip"]),
    "weather": (["{x} is expected to hit the coast tomorrow", "forecasters warned about {x} this weekend",
                 "{x} kept everyone indoors all day", "{x} brought freezing temperatures overnight",
                 "{x} cleared by the afternoon", "the airport closed because of {x}"],
                ["{x} will move north during the night", "the radar shows {x} approaching the valley",
                 "meteorologists tracked {x} over the sea", "{x} flooded the streets near the river"]),
}


def rows(split: int) -> list[dict]:
    out = []
    for label, topic in enumerate(LABELS):
        for t in TEMPLATES[topic][split]:
            for w in WORDS[topic][split]:
                s = t.format(x=w)
                out.append({"text": s[0].upper() + s[1:] + ".", "label": label, "topic": topic})
    random.Random(split).shuffle(out)
    return out


if __name__ == "__main__":
    here = Path(__file__).parent
    for name, split in (("topics_train.jsonl", 0), ("topics_test.jsonl", 1)):
        data = rows(split)
        (here / name).write_text("".join(json.dumps(r) + "\n" for r in data), encoding="utf-8")
        print(name, len(data))
