"""Run the expansion in this process, or as N processes through torchrun / the deepspeed launcher.

`expand(...)` takes the arguments of `run_expand` and returns its ExpandResult either way, so a
caller (the Prefect flow, the CLI) does not care how many processes trained:

- `expand.nproc_per_node: 1`, no hostfile (the default): `run_expand` in this process.
- `expand.nproc_per_node: N`: `torchrun --standalone --nproc_per_node N -m cmoe.stages.expand_main`.
- `expand.hostfile: FILE`: `deepspeed --hostfile FILE --module cmoe.stages.expand_main` (multi-node;
  passwordless ssh between the hosts, and `home` on storage they all see).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import yaml

from cmoe.config import CmoeConfig
from cmoe.data.evalsets import EvalSetRef
from cmoe.data.validate import ValidatedBundle
from cmoe.redact import SECRET_ENV, redact_uri
from cmoe.stages import expand as expand_stage
from cmoe.stages.expand import ExpandResult, OnLog, Variant
from cmoe.stages.expand_main import RESULT_FILE, STEP_LOG, read_steps
from cmoe.stages.probe import ProbeReport

ENTRY = "cmoe.stages.expand_main"
FOLLOW_S = 1.0  # how often the launching process passes on the ranks' new training-curve points
_RANK_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK")


class LaunchError(RuntimeError):
    """The launcher or one of its processes failed; the message holds the command and the exit code."""


def launcher_command(cfg: CmoeConfig, args: list[str]) -> list[str]:
    """The command that starts `expand_main` with `args` on cfg.expand's processes (and hosts)."""
    n = cfg.expand.nproc_per_node
    if cfg.expand.hostfile:
        return [sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", cfg.expand.hostfile,
                "--module", ENTRY, *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
            "-m", ENTRY, *args]


def expand(
    cfg: CmoeConfig, bundle: ValidatedBundle, parent_state: Path | None, probe: ProbeReport | None, out_dir: Path,
    *, eval_set: EvalSetRef | None = None, copy_base: bool = True, variant: Variant = "cmoe",
    on_log: OnLog | None = None,
) -> ExpandResult:
    """`run_expand`, in-process or under the configured launcher; same result either way, and
    `on_log` sees the training curve as it comes either way (rank 0's)."""
    if cfg.expand.nproc_per_node == 1 and not cfg.expand.hostfile:
        # looked up at call time: whoever wraps or patches run_expand (tests count its calls) sees this call
        return expand_stage.run_expand(cfg, bundle, parent_state, probe, out_dir, eval_set=eval_set,
                                       copy_base=copy_base, variant=variant, on_log=on_log)
    out_dir = Path(out_dir).resolve()
    args = write_inputs(cfg, bundle, parent_state, probe, out_dir, eval_set=eval_set, copy_base=copy_base,
                        variant=variant)
    (out_dir / RESULT_FILE).unlink(missing_ok=True)
    (out_dir / STEP_LOG).unlink(missing_ok=True)  # a resumed run logs from its checkpoint on
    cmd = launcher_command(cfg, args)
    returncode = _follow(subprocess.Popen(cmd, env=launcher_env()), out_dir / STEP_LOG, on_log)
    if returncode != 0 or not (out_dir / RESULT_FILE).is_file():
        raise LaunchError(f"expansion failed (exit {returncode}): {' '.join(cmd)}")
    (out_dir / STEP_LOG).unlink(missing_ok=True)  # passed on to on_log: nothing reads it again
    return ExpandResult(**json.loads((out_dir / RESULT_FILE).read_text()))


def write_inputs(
    cfg: CmoeConfig, bundle: ValidatedBundle, parent_state: Path | None, probe: ProbeReport | None, out_dir: Path,
    *, eval_set: EvalSetRef | None, copy_base: bool, variant: Variant,
) -> list[str]:
    """Write what every rank reads into `out_dir/launch` (the exact config, bundle and plan of this
    call); the arguments of `expand_main`. The config is written with its secrets redacted: the
    ranks train, they never reach the registry whose URI may carry a password."""
    inputs = out_dir / "launch"
    inputs.mkdir(parents=True, exist_ok=True)
    (inputs / "config.yaml").write_text(yaml.safe_dump(json.loads(redact_uri(json.dumps(cfg.model_dump(mode="json"))))))
    # The validated bundle travels as JSON: the ranks read it without validating it again.
    (inputs / "bundle.json").write_text(json.dumps(bundle.to_dict(), indent=2))
    args = ["--config", str(inputs / "config.yaml"), "--bundle", str(inputs / "bundle.json"), "--out", str(out_dir),
            "--variant", variant]
    if eval_set is not None:
        (inputs / "eval_set.json").write_text(json.dumps(asdict(eval_set), indent=2))
        args += ["--eval-set", str(inputs / "eval_set.json")]
    if probe is not None:
        (inputs / "probe.json").write_text(json.dumps(asdict(probe), indent=2))
        args += ["--probe", str(inputs / "probe.json")]
    if parent_state is not None:
        args += ["--parent-state", str(Path(parent_state).resolve())]
    if not copy_base:
        args.append("--no-copy-base")
    return args


def launcher_env() -> dict[str, str]:
    """The launcher's environment: this process's, without what must not reach the ranks.

    A process that trained in-process before holds a rank-0-of-1 group: its rendezvous variables
    (and port) must not leak into the launched ranks. The MLflow and Prefect credentials go too:
    the ranks use neither, and the `deepspeed` launcher copies every MLFLOW* variable into the
    command line it logs and runs on each host. S3 keys stay (a rank may read an s3:// bundle).
    The ranks find the code the way this process did, whatever the working directory.
    """
    dropped = set(_RANK_ENV) | {name for name in SECRET_ENV if not name.startswith("AWS_")}
    env = {k: v for k, v in os.environ.items() if k not in dropped}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[2]), env.get("PYTHONPATH")]))
    return env


def _follow(process: subprocess.Popen, step_log: Path, on_log: OnLog | None) -> int:
    """Wait for the launcher, passing rank 0's new training-curve points to `on_log` as they come; its exit code."""
    offset = 0
    try:
        while True:
            try:
                returncode = process.wait(timeout=FOLLOW_S)
            except subprocess.TimeoutExpired:
                returncode = None
            if on_log is not None:
                points, offset = read_steps(step_log, offset)
                for step, metrics in points:
                    on_log(step, metrics)
            if returncode is not None:
                return returncode
    except BaseException:  # a failing on_log, or this process told to stop: leave no ranks training behind
        process.kill()
        process.wait()
        raise
