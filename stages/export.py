"""Export out/ckpt.pt to out/hf/, a GPT2LMHeadModel folder that Hugging Face transformers loads (config, safetensors
weights, tokenizer, generation config from the sample settings, model card). Run it after `dvc repro`: it is a
command, not a pipeline stage, so that it does not add seconds to every experiment."""

from pathlib import Path

from nanogpt import cli
from nanogpt.errors import exit_on_user_error
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
    export_checkpoint(args.checkpoint, args.metrics, cli.config(args), args.output)
    print(f"exported {args.checkpoint} to {args.output}/")


if __name__ == "__main__":
    main()
