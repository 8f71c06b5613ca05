"""A toy fine-tune through loop.fit and the distributed helpers, run alone or under torchrun by
tests/test_distributed_finetune.py: ``python distributed_toy.py OUT_DIR`` writes each rank's final
weight and history to OUT_DIR/rank<R>.json.

With the gradients averaged over ranks that each take ``BATCH / world`` of every batch, two ranks
must train exactly what one process does with whole batches.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from posterfusion import distributed
from posterfusion.loop import Schedule, fit

ROWS, BATCH = 42, 8
SCORES = [0.5, 0.7, 0.6, 0.65, 0.1, 0.9]  # rank 0's: epoch 2 is the best, patience 3 stops after epoch 5


def main(out: Path) -> None:
    x = torch.randn(ROWS, 3, generator=torch.Generator().manual_seed(1))
    y = (x.sum(1, keepdim=True) > 0).float()
    with distributed.session("cpu") as device:
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 1)
        order = torch.Generator().manual_seed(2)
        scores, gathered_rows = iter(SCORES), []

        def batches(epoch: int):
            mine = distributed.training_share(torch.randperm(ROWS, generator=order).numpy())
            step = BATCH // distributed.world()
            for start in range(0, len(mine), step):
                yield (x[mine[start : start + step]],), y[mine[start : start + step]]

        def validate() -> float:
            rows = distributed.share(torch.arange(ROWS).numpy())
            with torch.no_grad():
                predictions = model(x[rows]).numpy()
            gathered_rows.append(len(distributed.gathered(predictions)[0]))
            score = next(scores)
            return score if distributed.is_main() else -score  # the others' scores must not count

        result = fit(distributed.wrap(model, torch.device(device)), batches, validate, torch.nn.BCEWithLogitsLoss(),
                     torch.optim.SGD(model.parameters(), lr=0.5), Schedule(epochs=10, patience=3))
        out.mkdir(parents=True, exist_ok=True)
        (out / f"rank{distributed.rank()}.json").write_text(json.dumps({
            "weight": model.weight.detach().flatten().tolist() + model.bias.detach().tolist(),
            "best_epoch": result.best_epoch, "history": result.history, "gathered_rows": gathered_rows,
        }))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
