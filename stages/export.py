"""Stage 5: export out/ckpt.pt to out/hf/, a folder that Hugging Face transformers loads with AutoModelForCausalLM
and AutoTokenizer (config, safetensors weights, tokenizer, generation config from the sample settings, model card).

A model that no standard transformers class expresses (model.qk_norm: true) is not an error, so that every
experiment still runs: the folder then holds only a README.md naming the option and the way out, and the stage
prints one `warning:` line."""

from pathlib import Path

from nanogpt import cli
from nanogpt.errors import exit_on_user_error, run_and_exit, warn
from nanogpt.export import export_checkpoint


@exit_on_user_error
def main() -> None:
    p = cli.parser(__doc__)
    p.add_argument("--checkpoint", type=Path, default=Path("out/ckpt.pt"), help="default: out/ckpt.pt")
    p.add_argument(
        "--metrics",
        type=Path,
        default=Path("metrics/train.json"),
        help="the checkpoint's training summary (default: metrics/train.json)",
    )
    p.add_argument("--output", type=Path, default=Path("out/hf"), help="the folder to (re)write (default: out/hf)")
    args = p.parse_args()
    refused = export_checkpoint(args.checkpoint, args.metrics, cli.config(args), args.output)
    if refused is None:
        print(f"exported {args.checkpoint} to {args.output}/")
    else:
        warn(f"{args.output}/ holds only a README.md, no model: {refused}")


if __name__ == "__main__":
    run_and_exit(main)
