"""``--report-to``: the experiment trackers training logs go to, checked before anything loads."""

from __future__ import annotations

import importlib.util

from .errors import InputError, did_you_mean

_PACKAGES = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",), "trackio": ("trackio",),
             "mlflow": ("mlflow",), "comet_ml": ("comet_ml",), "neptune": ("neptune",), "clearml": ("clearml",),
             "dvclive": ("dvclive",), "swanlab": ("swanlab",), "codecarbon": ("codecarbon",)}


def check_report_to(names: list[str]) -> None:
    """Each name is a transformers integration whose package is installed (or ``none`` / ``all`` alone)."""
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    if len(names) > 1 and ({"none", "all"} & set(names)):
        raise InputError(f"`report_to` takes 'none' or 'all' alone, got {','.join(names)}.", field="report_to")
    known = sorted(INTEGRATION_TO_CALLBACK)
    for name in names:
        if name in {"none", "all"}:
            continue
        if name not in INTEGRATION_TO_CALLBACK:
            raise InputError(f"`report_to` should be none, all or one of {', '.join(known)}, got {name!r}."
                             f"{did_you_mean(name, known)}", field="report_to")
        packages = _PACKAGES.get(name, (name,))
        if not any(importlib.util.find_spec(package) for package in packages):
            raise InputError(f"`report_to` {name} needs the '{packages[0]}' package: pip install {packages[0]}",
                             field="report_to")
