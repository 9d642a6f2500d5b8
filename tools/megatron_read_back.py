"""Check `paratron convert --saver megatron` against Megatron-Core itself.

For each case, the Megatron-Core-written legacy fixture (tests/fixtures/megatron/<arch>/tp1/
torch) is converted by `paratron convert --loader megatron --saver megatron` to another
layout; then every rank of that layout builds Megatron-Core's GPTModel from the `args` the
saver wrote (tools/make_megatron_fixtures.py's builder and CPU patches), loads its
`model_optim_rng.pt` with `torch.load` and `load_state_dict(strict=True)`, as Megatron's
`load_checkpoint` does, runs the forward on the fixture tokens and compares the logits with
the fixture's logits.npy. Two settings are not taken from the saved args because they are
how this CPU run executes, not the weights: the `allgather` token dispatcher (alltoall needs
CUDA streams) and the attention backend (an enum the saver does not pickle). The record of
every case (max abs difference, versions, commands) goes to
tests/fixtures/megatron/read_back/RECORD.json; a difference above 1e-5 fails the run.

Usage: ``OMP_NUM_THREADS=1 /tmp/mcore_venv/bin/python tools/megatron_read_back.py``
"""

import json
import os
import socket
import subprocess
import sys
import tempfile
from argparse import Namespace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_megatron_fixtures as fixtures  # noqa: E402 - needs the path above

import megatron.core  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "megatron"
RECORD = FIXTURES / "read_back" / "RECORD.json"
TOLERANCE = 1e-5
CASES = [("llama", (2, 2, 1)), ("qwen2", (2, 2, 1)), ("qwen3", (2, 2, 1)),
         ("gpt2", (2, 2, 1)), ("qwen3_moe_sequential", (1, 2, 2)),
         ("qwen3_moe_sequential", (2, 2, 1))]


def convert_command(arch, layout, save_dir):
    tp, pp, ep = layout
    return ["paratron", "convert", "--model-type", "GPT", "--loader", "megatron",
            "--saver", "megatron",
            "--load-dir", str((FIXTURES / arch / "tp1" / "torch").relative_to(ROOT)),
            "--save-dir", str(save_dir), "--target-tensor-parallel-size", str(tp),
            "--target-pipeline-parallel-size", str(pp),
            "--target-expert-parallel-size", str(ep)]


def worker(rank, world, port, layout, save_dir, out_file):
    """One rank: Megatron-Core's model from the saved args, loaded strictly, run forward."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    fixtures._patch_for_cpu()
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.enums import AttnBackend
    dist.init_process_group("gloo", rank=rank, world_size=world)
    tp, pp, ep = layout
    ps.initialize_model_parallel(tensor_model_parallel_size=tp,
                                 pipeline_model_parallel_size=pp,
                                 expert_model_parallel_size=ep)
    sizes = Namespace(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                      expert_model_parallel_size=ep)
    name = Path(fixtures.legacy_name(
        "", ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank(),
        ps.get_expert_model_parallel_rank(), sizes)).parent.name
    state = torch.load(os.path.join(save_dir, "release", name, "model_optim_rng.pt"),
                       weights_only=False)
    args = state["args"]
    args.attention_backend = AttnBackend.auto
    args.moe_token_dispatcher_type = "allgather"
    model = fixtures.build_model(args, fixtures.make_config(args))
    model.load_state_dict(state["model"], strict=True)
    model.eval()
    logits = fixtures.forward(model, args)
    if logits is not None and ps.get_tensor_model_parallel_rank() == 0 and \
            ps.get_expert_model_parallel_rank() == 0:
        np.save(out_file, logits.float().numpy())
    ps.destroy_model_parallel()
    dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_case(arch, layout, scratch):
    save_dir = Path(scratch) / f"{arch}-{fixtures.layout_name(*layout)}"
    command = convert_command(arch, layout, save_dir)
    subprocess.run([sys.executable, "-m", "paratron.cli.convert", *command[2:]], cwd=ROOT,
                   check=True, stdout=subprocess.DEVNULL)
    out_file = Path(scratch) / f"{save_dir.name}.npy"
    tp, pp, ep = layout
    world = pp * max(tp, ep)
    mp.spawn(worker, args=(world, free_port(), layout, str(save_dir), str(out_file)),
             nprocs=world, join=True)
    want = np.load(FIXTURES / arch / "tp1" / "logits.npy")
    diff = float(np.abs(np.load(out_file) - want).max())
    return {"architecture": arch, "source": f"{arch}/tp1/torch",
            "layout": fixtures.layout_name(*layout), "tp": tp, "pp": pp, "ep": ep,
            "max_abs_diff": diff, "tolerance": TOLERANCE, "passed": diff <= TOLERANCE,
            "command": " ".join(c if c != str(save_dir) else "OUT" for c in command)}


def main():
    records = []
    with tempfile.TemporaryDirectory() as scratch:
        for arch, layout in CASES:
            records.append(run_case(arch, layout, scratch))
            print(json.dumps(records[-1]))
    RECORD.parent.mkdir(exist_ok=True)
    RECORD.write_text(json.dumps({
        "megatron_core": megatron.core.__version__, "torch": torch.__version__,
        "command": "OMP_NUM_THREADS=1 python tools/megatron_read_back.py",
        "cases": records}, indent=1) + "\n")
    return 0 if all(r["passed"] for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
