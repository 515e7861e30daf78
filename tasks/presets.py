"""Loss + miner presets: the configurations metric-learning users ask for, as ``train`` params.

Each is a params preset file, ``params/mining/<name>.yaml`` (the one source: README "Presets"
lists them; ``--preset params/mining/batch-hard.yaml`` applies one, after a dataset preset if
given one too). Tests train every one for a few epochs on separable data and check that the loss
falls and Recall@1 rises. ``num_classes`` / ``embedding_size`` of proxy losses are filled in from
the data and ``train.embedding_dim`` when left out.
"""

from __future__ import annotations

from pathlib import Path

from tasks.params_preset import read_preset

MINING = Path(__file__).resolve().parents[1] / "params" / "mining"


def _train_keys(path: Path) -> dict:
    keys = read_preset(path)
    if any(not k.startswith("train.") for k in keys):
        raise ValueError(f"{path}: a mining preset changes train keys only")
    return {k.removeprefix("train."): v for k, v in keys.items()}


# name -> what goes under ``train:``
PRESETS: dict[str, dict] = {path.stem: _train_keys(path) for path in sorted(MINING.glob("*.yaml"))}
