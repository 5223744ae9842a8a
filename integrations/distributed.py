"""Train a soft prompt on several processes with torch.distributed (DDP or FSDP2), on a CPU.

The prompt is attached first and the model wrapped afterwards; neither library changes:

    att = ph.attach(model, ph.PromptTuning(8))   # registers model.prompthooks, freezes the base
    ddp = DistributedDataParallel(model)         # syncs what requires grad: the prompt
    optimizer = torch.optim.AdamW(ddp.parameters(), lr=...)

DDP keeps a full copy of the model on every rank and averages, across ranks, the
gradients of the parameters that require grad: only the prompt's gradients travel.
FSDP2 (``--fsdp``: ``torch.distributed.fsdp.fully_shard`` on each decoder layer and on
the model) shards every parameter, frozen base and prompt alike, along dim 0 across the
ranks, all-gathers them for each forward and backward and reduce-scatters the prompt's
gradients. Both run on a CPU with the gloo backend (torch 2.13 checked). FSDP2 keeps the
prompt's parameters as DTensor shards, so ``att.save`` gathers them: under FSDP2 call it
on every rank (rank 0 writes the file); under DDP call it on rank 0. On GPUs pass
``--backend nccl``: the device mesh and the batch then go to ``cuda:LOCAL_RANK`` (not run
here: no GPU).

Every rank takes its own slice of one fixed global batch (rows of equal length, no
padding, labels = input ids). Each rank's loss is then a mean over the same number of
label tokens, so the averaged gradient is exactly the gradient of the global batch's mean
loss, and N steps on R ranks give the prompt of N single-process steps on the whole
batch, up to float rounding. ``tests/test_distributed.py`` checks that against a
single-process run built from :func:`tiny_model`, :func:`tiny_batch` and
:func:`make_spec`. The model trains in train mode; neither the tiny LLaMA nor SmolLM2 has
dropout (``attention_dropout=0``), so every rank computes deterministically.

Run from the repository root, after ``pip install -e .`` (2 processes, gloo, CPU):

    torchrun --standalone --nproc_per_node 2 integrations/distributed.py --tiny \\
        --method prompt prefix --steps 5 --out /tmp/prompthooks-ddp
    torchrun --standalone --nproc_per_node 2 integrations/distributed.py --tiny --fsdp \\
        --method prompt prefix --steps 5 --out /tmp/prompthooks-fsdp
    torchrun --standalone --nproc_per_node 2 integrations/distributed.py --model smollm2 \\
        --wrapper ddp fsdp --method prompt --steps 10 --out /tmp/prompthooks-smollm2

``--tiny`` builds a 2-layer random-weight LLaMA from a config (no download; a run takes
about 20 s on 2 cores, nearly all of it imports). ``--model smollm2`` loads SmolLM2-135M
offline (``integrations/assets.py``; after the demo's install command) and trains on four
sentences: the loss goes 4.65 -> 3.03 in 10 steps, DDP and FSDP2 ending with the same
prompt bit for bit (about 1.5 min for both on 2 cores). ``--method`` and ``--wrapper``
take several values and train each combination in turn, from a fresh model, in one
launch (``--fsdp`` is short for ``--wrapper fsdp``). Written to ``OUT/WRAPPER/METHOD/``:

* ``prompt.safetensors``: the trained prompt, written by rank 0 with ``att.save``
  (``ph.load`` reads it);
* ``rank{r}.safetensors``: rank r's own prompt values (full tensors), to compare ranks;
* ``rank{r}.json``: rank r's loss at every step (on its own rows), the shape of its local
  piece of each prompt parameter (a shard under FSDP2) and the run's settings.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn
from torch.distributed.tensor import DTensor

import prompthooks as ph

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_assets import VOCAB, tiny_llama  # noqa: E402

#: Rows of the global batch (split evenly across ranks) and their length, for --tiny.
GLOBAL_BATCH = 4
LENGTH = 12
#: Virtual tokens of the prompt or prefix.
NUM_VIRTUAL_TOKENS = 4
#: One seed for the model and the prompt: every rank starts from the same values.
SEED = 0
#: AdamW learning rates (--lr overrides): a prefix's MLP wants a much smaller one.
LR = {"prompt": 0.05, "prefix": 1e-4}

TEXTS = [  # --model smollm2: cut to the shortest row's token count, so no padding
    "The movie was a delight from start to finish, and the cast was superb.",
    "Paris is the capital of France, and Berlin is the capital of Germany.",
    "A dull, lifeless script that wastes a talented cast on a silly plot.",
    "The weather today is sunny with a light breeze coming from the west.",
]


def tiny_model() -> nn.Module:
    """The 2-layer random-weight LLaMA of ``tiny_assets`` (grouped-query attention, no
    dropout), in train mode."""
    model = tiny_llama(SEED)
    model.train()
    return model


def tiny_batch() -> torch.Tensor:
    """The fixed global batch for --tiny: ``(GLOBAL_BATCH, LENGTH)`` ids, no padding."""
    g = torch.Generator().manual_seed(SEED + 1)
    return torch.randint(3, VOCAB, (GLOBAL_BATCH, LENGTH), generator=g)


def make_spec(method: str, tiny: bool) -> ph.PromptTuning | ph.PrefixTuning:
    """The prompt spec; built (and randomly initialised) by ``ph.attach``."""
    if method == "prompt":
        return ph.PromptTuning(NUM_VIRTUAL_TOKENS)
    if method == "prefix":
        return ph.PrefixTuning(NUM_VIRTUAL_TOKENS, hidden_size=16 if tiny else 512)
    raise ValueError(f"--method must be 'prompt' or 'prefix', got {method!r}")


def attach_seeded(model: nn.Module, method: str, tiny: bool) -> ph.Attachment:
    """Attach with the prompt's random initialisation seeded: identical on every rank."""
    torch.manual_seed(SEED)
    return ph.attach(model, make_spec(method, tiny))


def smollm2_setup() -> tuple[nn.Module, torch.Tensor]:
    """SmolLM2-135M (train mode) and :data:`TEXTS` tokenized to one length."""
    from assets import load_smollm2  # next to this script, on the path (see the imports)

    model, tokenizer = load_smollm2()
    rows = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in TEXTS]
    length = min(len(r) for r in rows)
    model.train()
    return model, torch.tensor([r[:length] for r in rows])


def prompt_values(att: ph.Attachment) -> dict[str, torch.Tensor]:
    """The prompt's full tensors by ``att.prompts`` state_dict key. Under FSDP2 the
    parameters are DTensor shards and this all-gathers them: call it on every rank."""
    out = {}
    for key, value in att.prompts.state_dict().items():
        if isinstance(value, DTensor):
            value = value.full_tensor()
        out[key] = value.detach().cpu().contiguous().clone()
    return out


def shard_shapes(att: ph.Attachment) -> dict[str, list[int]]:
    """The shape of this rank's local piece of each prompt parameter (FSDP2: a shard)."""
    return {
        key: list(value.to_local().shape if isinstance(value, DTensor) else value.shape)
        for key, value in att.prompts.state_dict().items()
    }


def make_optimizer(name: str, params: Iterator[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    """AdamW (the usual choice) or plain SGD. The test uses SGD: Adam divides each
    gradient by its running magnitude, so for a gradient that is nearly zero a rounding
    difference (one global sum vs per-rank sums) becomes a visible difference in the step;
    SGD keeps it at rounding level, and the comparison can be exact to fp32 tolerance."""
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    raise ValueError(f"--optimizer must be 'adamw' or 'sgd', got {name!r}")


def wrap(model: nn.Module, wrapper: str, device: torch.device) -> nn.Module:
    """DDP, or FSDP2 with one shard group per decoder layer plus the root (which holds the
    embedding, the head and the prompt)."""
    if wrapper == "ddp":
        return nn.parallel.DistributedDataParallel(model)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for layer in getattr(getattr(model, "model", None), "layers", []):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def train(args: argparse.Namespace, wrapper: str, method: str, device: torch.device) -> None:
    """Train one prompt on this rank's shard; write its values (and rank 0 the prompt file)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.tiny:
        model, ids = tiny_model(), tiny_batch()
    else:
        model, ids = smollm2_setup()
    if ids.shape[0] % world:
        raise SystemExit(f"{ids.shape[0]} rows cannot be split evenly across {world} ranks")
    per = ids.shape[0] // world
    ids = ids[rank * per : (rank + 1) * per].to(device)  # this rank's shard of the global batch
    mask = torch.ones_like(ids)
    model.to(device)

    att = attach_seeded(model, method, args.tiny)  # attach first, then wrap
    wrapped = wrap(model, wrapper, device)
    lr = LR[method] if args.lr is None else args.lr
    optimizer = make_optimizer(args.optimizer, wrapped.parameters(), lr)  # user code style

    losses = []
    for step in range(args.steps):
        optimizer.zero_grad()
        loss = wrapped(input_ids=ids, attention_mask=mask, labels=ids, use_cache=False).loss
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        mean = loss.detach().clone()
        dist.all_reduce(mean)  # equal token counts per rank: the global batch's mean loss
        if rank == 0:
            print(f"{wrapper} {method} step {step + 1}: loss {float(mean) / world:.4f}", flush=True)

    out = args.out / wrapper / method
    out.mkdir(parents=True, exist_ok=True)
    local = shard_shapes(att)
    values = prompt_values(att)  # a collective under FSDP2: every rank takes part
    save_file(values, str(out / f"rank{rank}.safetensors"))
    report: dict[str, Any] = {
        "rank": rank,
        "world_size": world,
        "method": method,
        "wrapper": wrapper,
        "kernels": os.environ.get("PROMPTHOOKS_KERNELS", "auto"),
        "rows": per,
        "optimizer": args.optimizer,
        "lr": lr,
        "steps": args.steps,
        "losses": losses,
        "local_shapes": local,
    }
    (out / f"rank{rank}.json").write_text(json.dumps(report, indent=1))
    if wrapper == "fsdp" or rank == 0:  # sharded prompts: a collective, rank 0 writes
        att.save(out / "prompt.safetensors")
    dist.barrier()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--tiny", action="store_true", help="2-layer random LLaMA (tests)")
    which.add_argument("--model", choices=["smollm2"], help="a real model, offline")
    parser.add_argument(
        "--method",
        nargs="+",
        choices=["prompt", "prefix"],
        default=["prompt"],
        help="one or more; each trains a fresh model in turn",
    )
    parser.add_argument(
        "--wrapper",
        nargs="+",
        choices=["ddp", "fsdp"],
        default=["ddp"],
        help="one or more of ddp, fsdp (FSDP2 fully_shard); each runs every --method",
    )
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw")
    parser.add_argument("--lr", type=float, help=f"default: {LR}")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--fsdp", action="store_true", help="short for --wrapper fsdp")
    parser.add_argument("--backend", default="gloo", help="gloo (CPU) or nccl (GPUs)")
    args = parser.parse_args(argv)
    if args.fsdp:
        args.wrapper = ["fsdp"]
    if "RANK" not in os.environ:
        parser.error("launch it with torchrun --standalone --nproc_per_node 2 ...")

    dist.init_process_group(args.backend)
    device = torch.device("cpu")
    if args.backend == "nccl":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    try:
        for wrapper in args.wrapper:
            for method in args.method:
                train(args, wrapper, method, device)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
