"""The world a run trains in: a fixed set of workers, or an elastic one that re-forms when workers
leave or join (Horovod elastic, Gloo).

Either way `run(loop)` runs the training loop. A fixed world starts it once and ends with the first
failure. An elastic world keeps an in-memory commit of the components (state.Components) and, after
a reset, lets Horovod re-form the workers, binds the new world, rolls back to the commit after a
failure, syncs, and calls the loop again.
"""

from __future__ import annotations

import logging
import time

from . import dist
from .state import Components

log = logging.getLogger(__name__)


class FixedWorld:
    """horovodrun -np N: the workers of the start are the workers of the run."""

    elastic = False
    interrupted_at = None

    def __init__(self, sync, bind):
        self._sync, self._bind = sync, bind

    def run(self, loop) -> None:
        self._sync()
        loop()

    def started(self) -> None:
        """After a start's collectives (nothing to keep: a failure ends the job)."""

    def commit(self) -> None:
        """Nothing to roll back to."""


class ElasticWorld(dist.ElasticState):
    """Horovod's elastic state for the run's components. `sync` does a start's collectives on the
    re-formed workers, `bind` binds whatever depends on the world size and rank."""

    elastic = True

    def __init__(self, components: Components, sync, bind):
        self.components, self._sync, self._bind = components, sync, bind
        self.committed = None  # the in-memory copy a failure rolls back to
        self.interrupted_at = None  # when this process last saw a worker leave or join
        super().__init__(bcast_object=dist.broadcast_object, get_rank=dist.rank)

    # Horovod's State interface: called by hvd.elastic.run and by commit()
    def save(self) -> None:
        self.committed = self.components.commit()

    def restore(self) -> None:
        self.components.rollback(self.committed)

    def sync(self) -> None:
        self._sync()

    def reset(self) -> None:
        self._bind()

    def started(self) -> None:
        """After a start's collectives: the first commit (a failure before the next rolls back here)."""
        self.save()

    def run(self, loop) -> None:
        """The loop, entered again after every reset from the synced state (see the module docstring)."""

        def attempt(_state):
            try:
                loop()
            except dist.ELASTIC_INTERRUPTS as e:
                self.interrupted_at = time.monotonic()
                step = self.components.state.global_step
                if isinstance(e, dist.HostsUpdatedInterrupt):
                    log.warning("hosts changed: the workers re-form at step %d (just committed)", step)
                else:
                    log.warning("a worker was lost at step %d (%s): rolling back to the commit at step %d", step,
                                (str(e).strip() or type(e).__name__).splitlines()[0], self.committed["global_step"])
                raise

        dist.run_elastic(attempt, self)
