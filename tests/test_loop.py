"""The shared training loop on one process (a one-rank gloo group; FSDP2 wraps the networks there only for bf16).

Multi-rank behaviour (shard-local EMA, resume equality, 2 -> 1 ranks) is in tests/test_distributed_resume.py.
"""

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

import train
from model.config import get_preset
from model.loader import read_state_dict
from model.wan import WanModel
from tests._dist_worker import ToyNet, ToyObjective, toy_config
from tests._resume import Killed
from tests.conftest import fill_disk
from trainer.loop import Trainer
from trainer.objective import Networks, Phase
from utils import checkpoint as ckpt
from utils.checkpoint import latest_checkpoint, list_checkpoints, release_path
from utils.distributed import activation_checkpointed, close_distributed, shard_frozen
from utils.ema import canonical_name
from utils.metrics import NonFiniteLossError


@pytest.fixture(autouse=True)
def _fresh_process_group():
    yield
    close_distributed()  # tests that drive setup() directly leave the group up


def _full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def _first_step_grads(cfg) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Gradients reaching AdamW at step 0 and the parameters after it."""
    obj = ToyObjective(cfg, noise=False)
    trainer = Trainer(cfg, obj)
    trainer.setup()
    optimizer = trainer.optimizers["generator"]
    grads = []
    optimizer.register_step_pre_hook(lambda opt, args, kwargs: grads.extend(
        _full(p.grad) for p in opt.param_groups[0]["params"]))
    trainer.train_step(0)
    return grads, [_full(p) for p in optimizer.param_groups[0]["params"]]


def test_grad_accumulation_equals_one_big_batch():
    """4 micro-batches of 2 == one batch of 8 (same samples: the toy draws them one by one). Tolerance 1e-6: only the
    fp32 summation order differs."""
    accumulated = toy_config("", no_save=True, batch_size=2, total_batch_size=8, max_grad_norm_generator=1e3)
    grads_acc, params_acc = _first_step_grads(accumulated)
    close_distributed()
    grads_big, params_big = _first_step_grads(toy_config("", no_save=True, batch_size=8, max_grad_norm_generator=1e3))
    assert len(grads_acc) == len(grads_big) == 8
    for a, b in zip(grads_acc, grads_big):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    for a, b in zip(params_acc, params_big):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("strategy", ["full", "hybrid_full", "hybrid_zero2", "no_shard"])
def test_every_sharding_strategy_trains(tmp_path, strategy):
    obj = ToyObjective(toy_config(str(tmp_path), no_save=True, max_steps=2, sharding_strategy=strategy))
    assert Trainer(obj.cfg, obj).train() == 2
    assert len(obj.losses) == 2 and all(torch.isfinite(torch.tensor(v)) for _, v in obj.losses)


def test_crash_while_saving_keeps_previous_checkpoint(tmp_path, monkeypatch):
    real_commit = ckpt._commit

    def commit_then_crash(tmp, final):
        if final.name == "step_000004":
            raise Killed("injected crash between writing step_000004.tmp and renaming it")
        real_commit(tmp, final)

    monkeypatch.setattr(ckpt, "_commit", commit_then_crash)
    obj = ToyObjective(toy_config(str(tmp_path), max_steps=4))
    with pytest.raises(Killed, match="injected crash"):
        Trainer(obj.cfg, obj).train()
    assert latest_checkpoint(tmp_path).name == "step_000002"
    assert (tmp_path / "checkpoints" / "step_000004.tmp" / ".metadata").is_file()  # written, never published
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 4

    monkeypatch.setattr(ckpt, "_commit", real_commit)
    stale = [tmp_path / "checkpoint_model_000002" / ".tmp-0123abcd-model.pt", tmp_path / ".tmp-89abcdef-metrics.jsonl"]
    for path in stale:                                      # what a kill inside the export / metrics rewrite leaves
        path.write_bytes(b"partial")
    resumed = ToyObjective(toy_config(str(tmp_path), max_steps=4))
    assert Trainer(resumed.cfg, resumed).train() == 4
    assert [step for step, _ in resumed.losses] == [2, 3]  # resumed from step 2
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 4]
    assert not any(path.exists() for path in stale)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2, 3, 4]   # the redone steps 3-4 replace the killed run's rows
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))  # the stale folder was cleaned up


class TinyWanObjective(ToyObjective):
    """A tiny causal Wan generator regressed onto a constant through its teacher-forcing path (a method FSDP2 must
    hook besides ``forward``); bf16 inputs under mixed precision, fp32 timesteps."""

    def build_networks(self, device):
        torch.manual_seed(0)
        return Networks(trainable={"generator": WanModel(get_preset("tiny"), causal=True).to(device)})

    def data(self, rank, world_size, seed):
        gen = torch.Generator().manual_seed(seed + rank)
        self._data = iter(lambda: (torch.randn(1, 2, 16, 4, 4, generator=gen), torch.randn(1, 5, 32, generator=gen)),
                          None)
        return self._data

    def data_state(self):
        return {}

    def load_data_state(self, state):
        pass

    def loss(self, phase, batch, step):
        dtype = torch.bfloat16 if self.cfg.mixed_precision else torch.float32
        x, context = (t.to(dtype) for t in batch)
        model = self.networks.trainable[phase]
        out = model.forward_teacher_forcing(x, torch.full((1, 2), 937.5), context, clean_x=x)
        return F.mse_loss(out.float(), torch.full(out.shape, 0.1)), {}


def test_release_export_has_model_prefixed_wan_keys_and_loads(tmp_path):
    obj = TinyWanObjective(toy_config(str(tmp_path), max_steps=1, log_iters=1, ema_start_step=0))
    trainer = Trainer(obj.cfg, obj)
    trainer.train()
    path = release_path(tmp_path, 1)
    assert path == tmp_path / "checkpoint_model_000001" / "model.pt"
    payload = torch.load(path, map_location="cpu", weights_only=True)
    reference = WanModel(get_preset("tiny"), causal=True)
    expected = {f"model.{k}" for k in reference.state_dict()}
    assert set(payload) == {"generator", "generator_ema"}
    assert set(payload["generator"]) == expected and set(payload["generator_ema"]) == expected
    live = {canonical_name(n): _full(p) for n, p in trainer.networks.trainable["generator"].named_parameters()}
    for key, value in read_state_dict(path).items():  # model/loader.py reads it back as original Wan keys
        torch.testing.assert_close(value, live[key], rtol=0, atol=0)
    reference.load_state_dict({k[len("model."):]: v for k, v in payload["generator_ema"].items()}, strict=True)


def test_non_finite_loss_raises_naming_the_step(tmp_path):
    from utils.errors import UserError

    obj = ToyObjective(toy_config(str(tmp_path), max_steps=6, log_every=3, log_iters=2), nan_at=1)
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at step 2 \(generator_loss=nan") as err:
        Trainer(obj.cfg, obj).train()
    assert isinstance(err.value, UserError) and "\n" not in str(err.value)   # train.py prints it as one line
    assert latest_checkpoint(tmp_path) is None  # checked before the step-2 save: a diverged model is never saved


def test_train_help_lists_every_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.parse_args(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--config_path", "--logdir", "--no_save", "--no_visualize", "--disable-wandb", "--wandb-save-dir",
                 "--override"):
        assert flag in text


def test_bad_config_is_one_line_and_exit_code_2(tmp_path, repo_root, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer: diffusion\nlearning_rate: 1.0e-5\n")
    run = subprocess.run([sys.executable, "train.py", "--config_path", str(bad), "--logdir", str(tmp_path)],
                         cwd=repo_root, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stderr
    assert run.stderr.startswith("error: ") and run.stderr.count("\n") == 1
    assert "unknown key 'learning_rate'" in run.stderr and "did you mean 'lr'" in run.stderr

    good = tmp_path / "good.yaml"
    good.write_text("trainer: diffusion\n")
    assert train.main(["--config_path", str(good), "--override", "max_step=3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "unknown key 'max_step'" in err


def test_bf16_mixed_precision_with_activation_checkpointing(tmp_path):
    """bf16 compute on fp32 master weights, blocks recomputed in backward (the wrappers sit outside FSDP2's hooks)."""
    obj = TinyWanObjective(toy_config(str(tmp_path), no_save=True, max_steps=1, mixed_precision=True,
                                      gradient_checkpointing=True))
    trainer = Trainer(obj.cfg, obj)
    trainer.train()
    model = trainer.networks.trainable["generator"]
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert activation_checkpointed(model)   # the loop's wrappers: the one switch (models have no flag of their own)


@pytest.mark.parametrize("mixed", [False, True])
def test_one_rank_uses_fsdp_only_to_cast(tmp_path, mixed):
    """On one rank FSDP2 wraps the networks for bf16 compute only: in fp32 it would add hooks and copies to every block
    call and nothing else (``distributed.fsdp_needed``)."""
    from torch.distributed.fsdp import FSDPModule

    obj = TinyWanObjective(toy_config(str(tmp_path), no_save=True, max_steps=1, mixed_precision=mixed,
                                      gradient_checkpointing=False))
    trainer = Trainer(obj.cfg, obj)
    trainer.setup()
    trainer.train_step(0)
    model = trainer.networks.trainable["generator"]
    assert isinstance(model, FSDPModule) == mixed
    assert all(isinstance(p, DTensor) == mixed for p in model.parameters())


def test_ema_copy_to_a_frozen_twin(tmp_path):
    """copy_to fills an identically sharded frozen network (the CD target) and leaves the live weights alone."""
    obj = ToyObjective(toy_config(str(tmp_path), no_save=True, max_steps=3, ema_start_step=0))
    trainer = Trainer(obj.cfg, obj)
    trainer.setup()
    for step in range(3):
        trainer.train_step(step)
    ema, model = trainer.emas["generator"], trainer.networks.trainable["generator"]
    expected = ema.full_state_dict()
    live = {canonical_name(n): _full(p) for n, p in model.named_parameters()}
    assert any(not torch.equal(live[n], expected[n]) for n in live)

    twin = shard_frozen(ToyNet(), "full")
    ema.copy_to(twin)
    for name, p in twin.named_parameters():
        torch.testing.assert_close(_full(p), expected[name], rtol=0, atol=0)
    for name, p in model.named_parameters():
        torch.testing.assert_close(_full(p), live[canonical_name(name)], rtol=0, atol=0)


class _TwoPhaseObjective(ToyObjective):
    """Two trainable toys stepped in one training step; records which micro-batch each phase saw."""

    def __init__(self, cfg, fresh: bool):
        super().__init__(cfg, noise=False)
        self.fresh_batch_per_phase = fresh
        self.seen: list[tuple[str, torch.Tensor]] = []

    def build_networks(self, device):
        return Networks(trainable={"generator": ToyNet().to(device), "critic": ToyNet().to(device)})

    def phases(self):
        c = self.cfg
        return [Phase(name, lr=c.lr, betas=(c.beta1, c.beta2), max_grad_norm=1.0) for name in ("generator", "critic")]

    def loss(self, phase, batch, step):
        self.seen.append((phase, batch[0].clone()))
        x, y = (t.to(self.networks.trainable[phase].out.weight.device) for t in batch)
        return F.mse_loss(self.networks.trainable[phase](x), y), {}


@pytest.mark.parametrize("fresh", [False, True])
def test_phases_share_or_draw_their_micro_batches(tmp_path, fresh):
    obj = _TwoPhaseObjective(toy_config(str(tmp_path), ema_weight=0.0), fresh)
    trainer = Trainer(obj.cfg, obj)
    trainer.setup()
    trainer.train_step(0)
    (p1, x1), (p2, x2) = obj.seen
    assert (p1, p2) == ("generator", "critic")
    assert torch.equal(x1, x2) != fresh  # DMD (fresh=True): the critic sees the next micro-batch, not the generator's


class _RunsCode:
    """Pickles as a call of ``os.system``: what a hostile checkpoint would plant."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os
        return os.system, (f"touch {self.marker}",)


def test_planted_pickle_in_a_checkpoint_is_refused_not_run(tmp_path, monkeypatch):
    """A resume checkpoint whose ``.metadata`` (or a non-tensor entry) pickles a call of ``os.system``: resuming stops
    with one line naming the file and the command never runs."""
    import pickle

    from utils.errors import CheckpointError

    marker = tmp_path / "code_ran"
    logdir = tmp_path / "metadata"
    obj = ToyObjective(toy_config(str(logdir), max_steps=2))
    Trainer(obj.cfg, obj).train()
    metadata = latest_checkpoint(logdir) / ".metadata"
    metadata.write_bytes(pickle.dumps(_RunsCode(marker)))
    resumed = ToyObjective(toy_config(str(logdir), max_steps=4))
    with pytest.raises(CheckpointError, match=r"\.metadata refers to posix\.system.*refusing") as err:
        Trainer(resumed.cfg, resumed).train()
    assert "\n" not in str(err.value) and not marker.exists()

    logdir = tmp_path / "entry"          # the metadata is genuine, one optimizer value pickles the call
    real_state = ckpt._dcp_state

    def planted(state):
        out = real_state(state)
        out["optim/generator"]["param_groups"][0]["lr"] = _RunsCode(marker)
        return out

    monkeypatch.setattr(ckpt, "_dcp_state", planted)
    obj = ToyObjective(toy_config(str(logdir), max_steps=2))
    Trainer(obj.cfg, obj).train()
    monkeypatch.setattr(ckpt, "_dcp_state", real_state)
    resumed = ToyObjective(toy_config(str(logdir), max_steps=4))
    with pytest.raises(CheckpointError, match=r"entry optim/generator\.param_groups.*lr.*refusing") as err:
        Trainer(resumed.cfg, resumed).train()
    assert "\n" not in str(err.value) and not marker.exists()


def test_full_disk_while_saving_is_one_line_and_resumable(tiny_disk):
    """A disk that fills during a checkpoint save: one line naming the checkpoint, the cause and the free space; the
    partial folder is removed and the previous checkpoint stays the latest; with room again, the run resumes."""
    from utils.errors import CheckpointError

    logdir = tiny_disk / "run"
    obj = ToyObjective(toy_config(str(logdir), max_steps=2))
    Trainer(obj.cfg, obj).train()
    filler = fill_disk(tiny_disk, leave=4096)
    obj = ToyObjective(toy_config(str(logdir), max_steps=4))
    with pytest.raises(CheckpointError, match=r"saving .*step_000004 failed \(OSError: .*No space left on device\); "
                                              r"the latest checkpoint is still step_000002 \(0 MiB free"):
        Trainer(obj.cfg, obj).train()
    assert [s for s, _ in list_checkpoints(logdir)] == [2] and not list((logdir / "checkpoints").glob("*.tmp"))
    filler.unlink()
    resumed = ToyObjective(toy_config(str(logdir), max_steps=4))
    assert Trainer(resumed.cfg, resumed).train() == 4 and [s for s, _ in resumed.losses] == [2, 3]


def test_export_lost_to_a_failure_is_written_on_resume(tmp_path, monkeypatch):
    """A failure between the checkpoint's commit and its release export (here a simulated full disk) leaves the
    checkpoint without its export: one line, and the resumed run writes the export from the restored weights."""
    import errno

    from model import loader
    from utils.errors import OutputError

    real_save = loader.save_release_checkpoint

    def disk_full(path, *args):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(loader, "save_release_checkpoint", disk_full)
    obj = ToyObjective(toy_config(str(tmp_path), max_steps=2))
    with pytest.raises(OutputError, match=r"exporting .*checkpoint_model_000002.model\.pt failed.*No space left.*"
                                          r"a resumed run writes the export"):
        Trainer(obj.cfg, obj).train()
    assert latest_checkpoint(tmp_path).name == "step_000002" and not release_path(tmp_path, 2).exists()
    live = {k: _full(v) for k, v in obj.networks.trainable["generator"].state_dict().items()}
    monkeypatch.setattr(loader, "save_release_checkpoint", real_save)
    resumed = ToyObjective(toy_config(str(tmp_path), max_steps=2))
    assert Trainer(resumed.cfg, resumed).train() == 2 and resumed.losses == []
    exported = torch.load(release_path(tmp_path, 2), map_location="cpu", weights_only=True)["generator"]
    for key, value in live.items():
        torch.testing.assert_close(exported[f"model.{canonical_name(key)}"], value, rtol=0, atol=0)


def test_two_runs_on_one_logdir_and_a_logdir_that_is_a_file(tmp_path):
    """A second run on a logdir in use stops at once with one line naming the holder (the lock is released when
    the first run ends, also when it crashes); a logdir that is a file is one line too."""
    import os

    from utils.checkpoint import LogdirLock
    from utils.errors import CheckpointError, OutputError

    holder = LogdirLock(tmp_path / "run")      # another run, as far as this one can tell
    obj = ToyObjective(toy_config(str(tmp_path / "run"), max_steps=2))
    with pytest.raises(CheckpointError, match=rf"run is in use by another training run \(pid {os.getpid()} on .*\): "
                                              r"wait for it to end or pass another --logdir"):
        Trainer(obj.cfg, obj).train()
    assert obj.losses == [] and latest_checkpoint(tmp_path / "run") is None
    holder.release()
    crashed = ToyObjective(toy_config(str(tmp_path / "run"), max_steps=2), crash_at=1)
    with pytest.raises(RuntimeError, match="injected crash"):
        Trainer(crashed.cfg, crashed).train()
    assert Trainer(obj.cfg, obj).train() == 2

    (tmp_path / "file").write_text("")
    obj = ToyObjective(toy_config(str(tmp_path / "file"), max_steps=2))
    with pytest.raises(OutputError, match=r"logdir .*file is a file, not a folder"):
        Trainer(obj.cfg, obj).train()
