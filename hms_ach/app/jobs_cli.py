"""``hms-ach jobs``: list the scheduled jobs with their next run and last outcome; ``jobs run NAME``
runs one now, in this process (the running engine's scheduler is not needed)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from hms_ach.core.errors import ConfigError, ConfigErrors

if TYPE_CHECKING:
    from hms_ach.app.runtime import Engine
    from hms_ach.app.scheduler import Scheduler

jobs_app = typer.Typer(
    no_args_is_help=False,
    invoke_without_command=True,
    help="Scheduled jobs: SFTP polls, credential-expiry scan, housekeeping.",
)
ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="channels.yaml to use")]


def _engine(config: Path) -> Engine:
    from hms_ach.app.config import load_config
    from hms_ach.app.runtime import Engine
    from hms_ach.channels import CHANNEL_TYPES
    from hms_ach.core.types import PollingChannel

    try:
        cfg = load_config(config)
    except (ConfigErrors, ConfigError) as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from exc
    engine = Engine(cfg)
    for settings in cfg.channels:
        if not settings.enabled:
            continue
        channel = CHANNEL_TYPES.load(settings.type)(settings, engine.pipeline)
        if isinstance(channel, PollingChannel):  # only polls run here: no listener is started
            engine.channels[settings.name] = channel
    return engine


def _scheduler(engine: Engine) -> Scheduler:
    from hms_ach.app.scheduler import Scheduler, build_jobs

    jobs = build_jobs(engine.config.jobs, engine.writer, engine.channels)
    return Scheduler(engine.store, engine.writer, jobs, engine.config.jobs)


@jobs_app.callback()
def jobs_list(ctx: typer.Context, config: ConfigOpt = Path("channels.yaml")) -> None:
    """List the jobs, their next run and their last outcome."""
    if ctx.invoked_subcommand is not None:
        ctx.obj = config
        return
    from hms_ach.store.job_runs import last_runs

    engine = _engine(config)
    try:
        sched = _scheduler(engine)
        with engine.store.read() as conn:
            runs = last_runs(conn)
        typer.echo(f"{'job':<28} {'next run':<26} {'last':<8} {'finished':<26} detail")
        for name in sched.jobs:
            nxt = sched.next_run(name)
            run = runs.get(name)
            finished = run.finished_at.isoformat(timespec="seconds") if run and run.finished_at else "-"
            detail = (run.detail or "") if run else ""
            typer.echo(
                f"{name:<28} {nxt.isoformat(timespec='seconds') if nxt else 'not scheduled':<26} "
                f"{(run.status if run else 'never') or '-':<8} {finished:<26} {detail[:80]}"
            )
    finally:
        engine.store.dispose()


@jobs_app.command("run")
def jobs_run(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="job name, as `hms-ach jobs` lists it")],
    config: ConfigOpt = Path("channels.yaml"),
) -> None:
    """Run one job now and print its outcome (exit 1 if it failed)."""
    engine = _engine(ctx.obj if config == Path("channels.yaml") and ctx.obj else config)

    async def go() -> tuple[str, str]:
        sched = _scheduler(engine)
        if name not in sched.jobs:
            typer.echo(f"no job {name!r}; jobs: {', '.join(sched.jobs)}", err=True)
            raise typer.Exit(2)
        for channel in engine.channels.values():
            await channel.start()
        return await sched.run_job(name)

    try:
        status, detail = asyncio.run(go())
    finally:
        engine.writer.stop()
        engine.store.dispose()
    typer.echo(f"{name}: {status}: {detail}")
    if status != "ok":
        raise typer.Exit(1)
