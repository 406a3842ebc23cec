"""Start-up of `seg predict`: imports, checkpoint loading and the first scan's preprocessing, for one source tree.

Run it once per tree to compare (e.g. a `git worktree` of an older commit beside this one), alternating:

    python bench/predict_startup.py TREE CHECKPOINT SCAN

Prints `imports_s total_s lightning_imported`. The editable install's import hook is removed first, so `seg` comes
from TREE.
"""

import sys
import time


def main() -> None:
    tree, checkpoint, scan = sys.argv[1:4]
    sys.meta_path = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
    sys.path.insert(0, tree)
    start = time.perf_counter()
    import seg.inference.predict  # noqa: F401
    from seg.inference.predictor import Predictor

    imported = time.perf_counter()
    predictor = Predictor.from_checkpoint(checkpoint, device="cpu")
    predictor.load([scan])
    done = time.perf_counter()
    import seg

    assert seg.__file__.startswith(tree), seg.__file__
    print(f"{imported - start:.3f} {done - start:.3f} {any(m.startswith('lightning') for m in sys.modules)}")


if __name__ == "__main__":
    main()
