"""Test-only: record everything a site sends (task results, streamed events) as JSON lines."""
import json
import threading
from pathlib import Path

import numpy as np
from nvflare.apis.fl_component import FLComponent
from nvflare.apis.fl_constant import FLContextKey, ReservedKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.filter import Filter
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.app_event_type import AppEventType

_LOCK = threading.Lock()


def plain(x, depth=0):
    if depth > 30:
        return {"__too_deep__": type(x).__name__}
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    if isinstance(x, np.generic):
        return x.item()
    if hasattr(x, "shape") and hasattr(x, "dtype"):  # numpy array or tensor: describe, do not copy
        return {"__array__": [int(n) for n in x.shape], "dtype": str(x.dtype)}
    if isinstance(x, dict):
        return {str(k): plain(v, depth + 1) for k, v in x.items()}
    if isinstance(x, (list, tuple, set)):
        return [plain(v, depth + 1) for v in x]
    if isinstance(x, FLContext):
        return {"__fl_context_public_props__": plain(x.get_all_public_props(), depth + 1)}
    if isinstance(x, (bytes, bytearray)):
        return {"__bytes__": len(x), "text": bytes(x[:4096]).decode("latin1")}
    return {"__object__": type(x).__name__, "repr": repr(x)[:4096]}


def _write(path, record):
    with _LOCK, open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def _peer(fl_ctx):
    peer = fl_ctx.get_peer_context()
    return plain(peer.get_all_public_props()) if isinstance(peer, FLContext) else None


class CaptureResults(Filter):
    def __init__(self, path):
        super().__init__()
        self.path = path

    def process(self, shareable, fl_ctx):
        _write(self.path, {"what": "task_result", "task": fl_ctx.get_prop(FLContextKey.TASK_NAME),
                           "site": shareable.get_peer_prop(ReservedKey.IDENTITY_NAME, None),
                           "shareable": plain(dict(shareable)), "peer_ctx": _peer(fl_ctx)})
        return shareable


class CaptureEvents(FLComponent):
    def __init__(self, path, event_types=("fed.analytix_log_stats",)):
        super().__init__()
        self.path, self.event_types = path, list(event_types)

    def handle_event(self, event_type, fl_ctx):
        if event_type in self.event_types:
            data = fl_ctx.get_prop(FLContextKey.EVENT_DATA)
            _write(self.path, {"what": "event", "event": event_type, "data": plain(data), "peer_ctx": _peer(fl_ctx)})


class SaveGlobalModels(FLComponent):
    """Write each round's global model (``round<r>.npz``) as scatter-and-gather makes it."""

    def __init__(self, folder):
        super().__init__()
        self.folder = folder

    def handle_event(self, event_type, fl_ctx):
        if event_type == AppEventType.AFTER_SHAREABLE_TO_LEARNABLE:
            Path(self.folder).mkdir(parents=True, exist_ok=True)
            ml = fl_ctx.get_prop(AppConstants.GLOBAL_MODEL)
            r = fl_ctx.get_prop(AppConstants.CURRENT_ROUND)
            np.savez(Path(self.folder) / f"round{r}.npz", **{k: np.asarray(v) for k, v in ml["weights"].items()})
