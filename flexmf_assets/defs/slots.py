"""Give back the concurrency-pool slots of runs that can no longer use them.

A training step claims a slot of its pool (``flexmf_training``, or ``gpu``) in its run's orchestrating
process, which gives it back when the step ends. A run whose process is killed (``kill -9``, the OOM
killer, a reboot) never does: the slot stays claimed, the pool fills up, and every later training waits
("blocked by limit for pool") until a person frees it. Dagster gives back the slots of *finished* runs
only when ``run_monitoring.free_slots_after_run_end_seconds`` is set (the ``dagster.yaml`` that
``flexmf`` writes sets it), and nothing notices a run left STARTED whose process is gone when no code
server watched it (an in-process ``flexmf`` run, a ``dagster dev`` that was itself killed).

:func:`free_dead_run_slots` does both: it is called by the ``free_dead_run_slots`` sensor (running by
default in the daemon; it never launches a run) and at the start of ``flexmf``'s in-process commands.
"""

from __future__ import annotations

import dagster as dg
from dagster._core.events import DagsterEventType

from flexmf_assets.files import process_alive_since

#: a run in one of these states claims slots through a process of its own, which may have died
_RUNNING = (dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.CANCELING)


def free_dead_run_slots(instance: dg.DagsterInstance) -> list[str]:
    """Free the pool slots (claimed or pending) of every run that is finished, deleted, or whose
    orchestrating process is gone; a run left STARTED or CANCELING by a dead process is marked failed
    first. Returns the ids of the runs whose slots were freed.

    Whether a process is gone is only decided where every run executes on this machine (the SQLite
    instance of ``DAGSTER_HOME``); on a shared Postgres instance runs of other hosts are never touched,
    and run monitoring of the run launcher fails them instead (docs/operations.md)."""
    storage = instance.event_log_storage
    if not storage.supports_global_concurrency_limits:
        return []
    run_ids = set(storage.get_concurrency_run_ids())  # runs with steps holding or waiting for a slot
    for info in storage.get_concurrency_infos(list(storage.get_concurrency_keys())).values():
        run_ids.update(slot.run_id for slot in info.claimed_slots)
    local = _single_machine(instance)
    freed = []
    for run_id in sorted(run_ids):
        run = instance.get_run_by_id(run_id)
        if run is not None and not run.is_finished:
            pid = _orchestrator_pid(instance, run) if local and run.status in _RUNNING else None
            if pid is None:
                continue  # alive, not started yet, or not ours to judge
            run = instance.get_run_by_id(run_id)  # its code server may have just marked it failed
            if run is not None and not run.is_finished:
                instance.report_run_failed(run, f"The run's process (pid {pid}) is gone (killed?): marked "
                                           "failed by flexmf, and its concurrency pool slots given back.")
        storage.free_concurrency_slots_for_run(run_id)
        freed.append(run_id)
    return freed


def _single_machine(instance: dg.DagsterInstance) -> bool:
    """True for an instance whose runs all execute on this machine: SQLite (or in-memory) storage."""
    if instance.is_ephemeral:
        return True
    ref = instance.get_ref()
    data = ref.storage_data or ref.event_storage_data
    return data is not None and "sqlite" in f"{data.module_name}.{data.class_name}".lower()


def _orchestrator_pid(instance: dg.DagsterInstance, run: dg.DagsterRun) -> int | None:
    """The pid of the process that started ``run`` (it claims the run's slots), when that process is
    gone; None while it runs (or when the run has no start event)."""
    starts = instance.all_logs(run.run_id, of_type=DagsterEventType.RUN_START)
    if not starts or starts[-1].dagster_event is None or starts[-1].dagster_event.pid is None:
        return None
    pid = starts[-1].dagster_event.pid
    return None if process_alive_since(pid, starts[-1].timestamp) else pid


def build_slots_sensor() -> dg.SensorDefinition:
    @dg.sensor(name="free_dead_run_slots", minimum_interval_seconds=30,
               default_status=dg.DefaultSensorStatus.RUNNING,
               description="Gives back the concurrency-pool slots of runs that finished or whose process "
               "is gone (a killed run worker), so later trainings are not blocked; launches no run.")
    def free_dead_run_slots_sensor(context: dg.SensorEvaluationContext):
        freed = free_dead_run_slots(context.instance)
        for run_id in freed:
            context.log.warning(f"gave back the pool slots of run {run_id} (finished, or its process is gone)")
        return dg.SkipReason(f"gave back the pool slots of {len(freed)} run(s): {', '.join(freed)}" if freed
                             else "no finished or dead run holds a pool slot")

    return free_dead_run_slots_sensor
