"""Stage 0: check every section of params.yaml, before any other stage runs and so before DVC deletes its outputs.

DVC deletes a stage's outputs just before it runs the stage's command, so a stage that rejected a bad value itself
would find its last good outputs already gone. Every other stage depends on out/params.ok instead, which this stage
writes only when the whole file is valid: a bad value stops `dvc repro` / `dvc exp run` here, with every earlier
output untouched. The file's content never changes, so a valid change reruns this check and, after it, only the
stages that read the changed keys.
"""

from pathlib import Path

from nanogpt import files, stage
from nanogpt.errors import exit_on_user_error, run_and_exit

OUTPUT = Path("out/params.ok")
CONTENT = "params.yaml passed `python -m stages.validate`; the other stages depend on this file to run after it\n"


@exit_on_user_error
def main() -> None:
    stage.config(stage.parser(__doc__).parse_args())
    files.write_text(OUTPUT, CONTENT)


if __name__ == "__main__":
    run_and_exit(main)
