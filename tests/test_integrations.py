"""The integration scripts, end to end on their ``--tiny`` configurations.

* ``integrations/hf_trainer.py``: an unchanged Hugging Face ``Trainer`` set-up
  trains the attached prompt; checkpoints hold it; a run resumed from the
  half-way checkpoint ends at exactly (``torch.equal``) the uninterrupted run's
  prompt; the base model is bit-identical after detaching; the optimizer holds
  state for the ``(P, hidden)`` table only; the Trainer's logged loss is the true
  mean loss.
* ``integrations/tune_loop.py``: a plain loop under ``@ph.tune`` learns (the loss
  falls), and the saved file reloads to exactly the values and the held-out loss
  the loop ended with.
* ``integrations/pipeline_generate.py``: ``pipeline("text-generation")`` with a
  prompt attached (batched, left-padded, greedy) equals an oracle that feeds the
  prompt by hand (``generate(inputs_embeds=cat(prompt, embeddings))``) for every
  input, and differs once the prompt is detached.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import prompthooks as ph
from tests.support.models import same_snapshot, snapshot

# File and workflow tests: the same on every kernel path; they run in the torch pass
# and the Triton pass deselects them (-m "not workflow").
pytestmark = pytest.mark.workflow

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integrations"))
import hf_trainer  # noqa: E402
import pipeline_generate  # noqa: E402
import tune_loop  # noqa: E402
from tiny_assets import counting_texts, tiny_llama, word_tokenizer  # noqa: E402

STEPS = 4  # --tiny: checkpoints after step 2 and step 4; the second run resumes from step 2


def equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def tensors_in(file: Path, prefix: str = "") -> dict[str, torch.Tensor]:
    with safe_open(str(file), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}


def untouched(model: torch.nn.Module) -> bool:
    """Is ``model`` (detached) exactly the ``--tiny`` model as built? ``tiny_llama`` is seeded."""
    return same_snapshot(snapshot(tiny_llama()), snapshot(model))


@pytest.fixture(scope="module")
def trainer_run(tmp_path_factory: pytest.TempPathFactory) -> hf_trainer.TrainerReport:
    out = tmp_path_factory.mktemp("trainer")
    return hf_trainer.main(["--tiny", "--max-steps", str(STEPS), "--output-dir", str(out)])


def test_trainer_trains_the_prompt_and_nothing_else(trainer_run: hf_trainer.TrainerReport) -> None:
    report = trainer_run
    assert not equal(report.initial, report.final)  # the prompt moved ...
    assert report.logged[0]["grad_norm"] > 0  # ... because its gradient arrived
    assert report.loss_after < report.loss_before - 0.05  # and it learned
    assert untouched(report.model)  # weights, requires_grad flags, hooks, submodules
    # The optimizer holds state for one tensor: the (8, 32) prompt table.
    optimizer = torch.load(report.checkpoint / "optimizer.pt", weights_only=True)
    assert [s["exp_avg"].shape for s in optimizer["state"].values()] == [(8, 32)]
    # The checkpoint's base weights are the untouched base weights.
    base = tiny_llama().state_dict()
    saved_base = {
        k: v
        for k, v in tensors_in(report.checkpoint / "model.safetensors").items()
        if not k.startswith(hf_trainer.PREFIX)
    }
    assert saved_base and all(torch.equal(base[k], v) for k, v in saved_base.items())


def test_trainer_checkpoints_hold_the_prompt(trainer_run: hf_trainer.TrainerReport) -> None:
    report = trainer_run
    half = tensors_in(report.checkpoint / "model.safetensors", hf_trainer.PREFIX)
    last = tensors_in(report.final_checkpoint / "model.safetensors", hf_trainer.PREFIX)
    assert report.checkpoint.name == f"checkpoint-{STEPS // 2}"
    assert list(half) == ["prompthooks.default.weight"]
    assert equal(half, report.steps[STEPS // 2])
    assert equal(last, report.final)
    assert not equal(half, last)
    # A checkpoint's prompt attached without a Trainer gives the trained prompt's loss.
    assert report.loss_from_checkpoint == report.loss_after


def test_trainer_resume_continues_from_the_checkpoint(
    trainer_run: hf_trainer.TrainerReport,
) -> None:
    report = trainer_run
    half = tensors_in(report.checkpoint / "model.safetensors", hf_trainer.PREFIX)
    assert not equal(report.fresh, half)  # the second run's own prompt was overwritten
    assert equal(report.resumed_start, half)
    saved = torch.load(report.checkpoint / "optimizer.pt", weights_only=True)["state"]
    loaded = report.resumed_optimizer["state"]
    assert saved.keys() == loaded.keys()
    for i in saved:
        assert saved[i].keys() == loaded[i].keys()
        assert all(torch.equal(saved[i][k], loaded[i][k]) for k in saved[i])
    assert float(saved[0]["exp_avg"].abs().sum()) > 0  # real moments, not a fresh optimizer
    # Same data order, same optimizer and scheduler state: bit-identical end point.
    assert equal(report.resumed_final, report.final)


def test_trainer_run_saves_the_prompt_file(trainer_run: hf_trainer.TrainerReport) -> None:
    report = trainer_run
    ((name, prompt),) = ph.load(report.prompt_file).items()
    assert equal({f"prompthooks.{name}.weight": prompt.table()}, report.final)


def test_trainer_logged_loss_is_the_mean_token_loss(tmp_path: Path) -> None:
    """Trainer divides the summed loss by a count of the user's targets
    (``num_items_in_batch``); the prompt keeps the targets the user's, so the
    logged loss is the model's own mean loss over the batch."""
    model, tokenizer = tiny_llama(), word_tokenizer()
    texts = counting_texts(8, seed=0)
    torch.manual_seed(0)
    with ph.attach(model, ph.PromptTuning(4)):
        expected = hf_trainer.heldout_loss(model, tokenizer, texts, batch_size=8)
        trainer = hf_trainer.build_trainer(
            model,
            tokenizer,
            [dict(tokenizer(t)) for t in texts],
            tmp_path,
            max_steps=1,
            save_steps=1,
            learning_rate=0.0,
            batch_size=8,
        )
        trainer.train()
    assert trainer.state.log_history[0]["loss"] == pytest.approx(expected, rel=1e-5)


def test_tune_loop_learns_and_reloads(tmp_path: Path) -> None:
    file = tmp_path / "prompt.safetensors"
    report = tune_loop.main(["--tiny", "--output", str(file)])
    k = len(report.losses) // 4
    assert sum(report.losses[-k:]) < sum(report.losses[:k])  # training loss went down
    assert report.eval_losses[-1] < report.base_loss - 0.05  # and held out, too
    # ph.load gives back exactly the prompt the decorated loop ended with.
    assert report.last_seen and equal(report.reloaded, report.last_seen)
    assert report.reloaded_loss == report.eval_losses[-1]
    assert list(tensors_in(file)) == ["default.weight"]
    assert untouched(report.model)


def test_pipeline_equals_the_oracle() -> None:
    texts = pipeline_generate.TINY_TEXTS
    assert len({len(t.split()) for t in texts[:2]}) == 2  # the first batch of 2 is padded
    report = pipeline_generate.main(["--tiny"])
    assert report.texts == texts
    assert all(len(t.split()) >= 6 for t in report.pipeline)  # no eos: 8 tokens, few special
    assert report.pipeline == report.oracle
    assert report.pipeline == report.generate
    assert all(a != b for a, b in zip(report.pipeline, report.without_prompt, strict=True))
    assert report.unchanged and untouched(report.model)
