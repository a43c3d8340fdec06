"""The miniworld demo with one change: how the full-budget ablations in docs/miniworld.md were run.

    python scripts/miniworld_variant.py OUT SEED "{'recipe': {'stage2_train_head': False}}"
    python scripts/miniworld_variant.py OUT SEED "{'extra': ['stage.finetune=full']}"

``recipe`` replaces fields of ``demo.FULL``; ``extra`` adds config overrides to both stages. One torch thread.
"""

import ast
import dataclasses
import sys

from genhancer.miniworld import demo, pin_threads

if __name__ == "__main__":
    out, seed, spec = sys.argv[1], int(sys.argv[2]), ast.literal_eval(sys.argv[3])
    pin_threads(1)
    demo.FULL = dataclasses.replace(demo.FULL, **spec.get("recipe", {}))
    extra, run_config = tuple(spec.get("extra", ())), demo.run_config
    demo.run_config = lambda *a, **k: run_config(*a, **{**k, "extra": tuple(k.get("extra", ())) + extra})
    demo.demo(out, seed=seed)
