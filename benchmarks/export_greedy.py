"""Does transformers continue a prompt greedily as the sample stage does? The export's done-when, on a real run.

    python -m benchmarks.export_greedy --folder out/hf --checkpoint out/ckpt.pt --prompt "ROMEO:"

Loads `--folder` with AutoModelForCausalLM and AutoTokenizer (no remote code), generates greedily in fp32 on the
CPU, and runs `python -m stages.sample --temperature 0 --quantize none --device cpu` on the checkpoint with the
same prompt and length; prints both texts' first difference (none: identical) and the largest logit difference
over the prompt plus the greedy text. Needs transformers (the `test` extra).
"""

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--folder", type=Path, default=Path("out/hf"))
    p.add_argument("--checkpoint", type=Path, default=Path("out/ckpt.pt"))
    p.add_argument("--prompt", default="ROMEO:")
    p.add_argument("--num-tokens", type=int, default=200)
    args = p.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nanogpt.checkpoint import load_checkpoint

    tokenizer = AutoTokenizer.from_pretrained(args.folder)
    model = AutoModelForCausalLM.from_pretrained(args.folder, torch_dtype=torch.float32).eval()
    own, _, _ = load_checkpoint(args.checkpoint, "cpu")
    ids = tokenizer(args.prompt, return_tensors="pt")["input_ids"]
    num_tokens = min(args.num_tokens, own.cfg.block_size - ids.size(1))  # transformers does not slide the context
    out = model.generate(ids, do_sample=False, max_new_tokens=num_tokens)
    theirs = tokenizer.decode(out[0, ids.size(1) :])
    with tempfile.TemporaryDirectory() as tmp:
        sample = [sys.executable, "-m", "stages.sample", "--checkpoint", str(args.checkpoint), "--device", "cpu"]
        flags = ["--prompt", args.prompt, "--num_tokens", str(num_tokens), "--temperature", "0"]
        subprocess.run([*sample, *flags, "--quantize", "none", "--output", f"{tmp}/s.txt"], check=True)
        ours = Path(f"{tmp}/s.txt").read_text()
    ours = ours.removeprefix(args.prompt)[: len(theirs)]
    first = next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b), None)
    with torch.no_grad():
        diff = (own(out)[0] - model(out).logits).abs().max().item()
    print(f"class {type(model).__name__}, {len(theirs)} characters compared, first difference at: {first}")
    print(f"max abs logit difference over {out.size(1)} tokens (fp32, CPU): {diff:.3g}")
    print("transformers:", repr(theirs[:120]))
    print("sample stage:", repr(ours[:120]))


if __name__ == "__main__":
    main()
