"""The server's model persistor for tail averaging (:mod:`fssl_covid.averaging`): FLARE plumbing only."""

from __future__ import annotations

import os

from nvflare.apis.fl_context import FLContext
from nvflare.app_common.abstract.model import ModelLearnable, ModelLearnableKey
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.app_event_type import AppEventType
from nvflare.app_opt.pt.file_model_persistor import PTFileModelPersistor

from .averaging import LAST_ROUND_MODEL, TailAverage, averaged_epochs


class TailAveragingPersistor(PTFileModelPersistor):
    """FLARE's ``PTFileModelPersistor`` whose final global model (``FL_global_model.pt``, the one cross-site
    evaluation scores and an admin downloads) is the average of the global models of the last
    ``average_last_rounds`` rounds.  The last round's own global model is kept beside it as
    ``FL_global_model_last_round.pt``.  Every round before the last is persisted as it is; with
    ``average_last_rounds`` 0 this is ``PTFileModelPersistor`` exactly.

    The persistor collects the global models from scatter-and-gather's ``AFTER_SHAREABLE_TO_LEARNABLE`` event, so
    ``persist_every_n_rounds`` does not matter.  A server restarted mid-run averages the rounds it saw after the
    restart (its log says how many)."""

    def __init__(self, average_last_rounds: int = 0, num_rounds: int = 0, start_round: int = 0, **kwargs):
        """Args:
        average_last_rounds: how many of the last rounds' global models make the final one (0: off).
        num_rounds, start_round: scatter-and-gather's (``"{num_rounds}"`` in the job config), to know the last
            rounds before they happen.
        **kwargs: ``PTFileModelPersistor``'s.
        """
        super().__init__(**kwargs)
        self.average_last_rounds = int(average_last_rounds)
        self.rounds = averaged_epochs(int(num_rounds), self.average_last_rounds)
        self.start_round = int(start_round)
        if self.average_last_rounds and not int(num_rounds):
            raise ValueError("TailAveragingPersistor: average_last_rounds needs num_rounds (\"{num_rounds}\")")
        self._average = TailAverage()

    def _round(self, fl_ctx: FLContext) -> int | None:
        current = fl_ctx.get_prop(AppConstants.CURRENT_ROUND)
        return None if current is None else int(current) - self.start_round

    def handle_event(self, event: str, fl_ctx: FLContext):
        super().handle_event(event, fl_ctx)
        if event == AppEventType.TRAINING_STARTED:
            self._average = TailAverage()
        elif event == AppEventType.AFTER_SHAREABLE_TO_LEARNABLE and self.rounds:
            ml = fl_ctx.get_prop(AppConstants.GLOBAL_MODEL)
            if ml is not None and self._round(fl_ctx) in self.rounds:
                self._average.add(ml[ModelLearnableKey.WEIGHTS])

    def save_model(self, ml: ModelLearnable, fl_ctx: FLContext):
        if not self.rounds or self._round(fl_ctx) != self.rounds[-1] or not self._average.count:
            super().save_model(ml, fl_ctx)
            return
        self._get_persistence_manager(fl_ctx).update(ml)
        self.save_model_file(os.path.join(self.log_dir, LAST_ROUND_MODEL))
        averaged = ModelLearnable()
        averaged[ModelLearnableKey.WEIGHTS] = self._average.result()
        averaged[ModelLearnableKey.META] = ml.get(ModelLearnableKey.META)
        super().save_model(averaged, fl_ctx)
        self.log_info(fl_ctx, f"final global model: the average of the last {self._average.count} rounds' "
                              f"global models ({LAST_ROUND_MODEL}: the last round's own)")
