"""Tail averaging: the final model is the uniform average of the models after each of the last k epochs (centralized
training) or the global models of the last k rounds (federated), instead of the last one alone.

With the cosine learning-rate schedule the last part of training wanders around a minimum; the average of those
iterates sits nearer its centre and generalizes better (stochastic weight averaging, Izmailov et al., UAI 2018,
there with a constant or cyclic rate).  It is free at training time (one running sum) and sends nothing extra: in
federated learning it is the server that averages the global models it already has
(:class:`fssl_covid.persistor.TailAveragingPersistor`).

Floating-point tensors are averaged; integer buffers (a batch norm's step counter) keep the last model's value.  The
networks of this project use instance norm (no running statistics); a batch-norm network's averaged running
statistics are an approximation (SWA would recompute them with a pass over the training data).
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch


#: the last round's own global model, beside the averaged ``FL_global_model.pt`` (``TailAveragingPersistor``)
LAST_ROUND_MODEL = "FL_global_model_last_round.pt"


class TailAverage:
    """Running uniform average of weight dictionaries (torch tensors or numpy arrays; the result has the last
    one's keys, types and dtypes).  Sums are kept in float64, so the order of ``add`` calls does not matter.

    Not ``torch.optim.swa_utils.AveragedModel``: that averages an ``nn.Module`` in place, while the FLARE server
    holds the global models as dictionaries of numpy arrays; this one copy serves the trainer and the server."""

    def __init__(self):
        self._sum: dict[str, torch.Tensor] = {}
        self._last: Mapping = {}
        self.count = 0

    def add(self, weights: Mapping) -> None:
        if self.count and set(weights) != set(self._last):
            raise ValueError("tail average: a model with other parameter names than the ones averaged so far")
        for k, v in weights.items():
            t = torch.as_tensor(np.asarray(v) if not isinstance(v, torch.Tensor) else v.detach().cpu())
            if t.is_floating_point():
                self._sum[k] = self._sum[k] + t.double() if k in self._sum else t.double().clone()
        self._last = weights
        self.count += 1

    def result(self) -> dict:
        if not self.count:
            raise ValueError("tail average of no models")
        out = {}
        for k, v in self._last.items():
            if k not in self._sum:
                out[k] = v
                continue
            mean = self._sum[k] / self.count
            if isinstance(v, torch.Tensor):
                out[k] = mean.to(v.dtype)
            else:
                out[k] = mean.numpy().astype(np.asarray(v).dtype)
        return out


def averaged_epochs(total: int, average_last: int) -> range:
    """The (0-based) epochs or rounds whose models are averaged: the last ``average_last`` of ``total``."""
    if average_last < 0:
        raise ValueError(f"the number of models to average must be 0 (off) or more, got {average_last}")
    return range(max(0, total - average_last), total) if average_last else range(0)
