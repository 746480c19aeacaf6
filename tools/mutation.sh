#!/usr/bin/env bash
# Mutation testing of one nanogpt module with mutmut (TESTING.md): change the module's code one small edit at a
# time (a `<` for a `<=`, a 1 for a 2, a deleted call) and check that its tests fail on each change.
#
#   pip install -e '.[mutation]'
#   tools/mutation.sh MODULE [MUTANT_NAME_PATTERN ...]    # MODULE: generate, sampling, data, tokenizer, files, config, optim
#
# Works on a copy of the working tree in .mutation/MODULE/ (gitignored; made afresh each run), so that runs of
# different modules keep their results apart; `cd .mutation/MODULE && mutmut show NAME` shows one mutant's diff,
# `mutmut browse` all of them. Each mutant runs only the module's own quick tests, in a forked process, one at a
# time (slow, so not part of CI). Prints the score and the surviving mutants.
set -euo pipefail
cd "$(dirname "$0")/.."

module=${1:?usage: tools/mutation.sh MODULE [MUTANT_NAME_PATTERN ...]}
shift
# the tests that cover each module and run in seconds: its own test file, less the slow tests (real CLI, compile)
# and the GPU ones (pytest_add_cli_args below)
case $module in
  generate | sampling | data | tokenizer | files | config | optim) tests=("tests/test_$module.py") ;;
  *) echo "unknown module $module: give one of generate, sampling, data, tokenizer, files, config, optim" >&2; exit 2 ;;
esac

work=.mutation/$module
rm -rf "$work"
mkdir -p "$work"
# the working tree as git sees it (committed, changed and new files), not build outputs or caches
git ls-files -z --cached --others --exclude-standard | tar --null --ignore-failed-read -T - -cf - | tar -xf - -C "$work"

# mutmut reads [mutmut] from setup.cfg (the project has none of its own); one value a line
{
  echo "[mutmut]"
  echo "source_paths = nanogpt"
  echo "only_mutate = nanogpt/$module.py"
  # what the tests read besides tests/ and the package
  printf 'also_copy =\n    stages\n    configs\n    params.yaml\n    params.schema.json\n    dvc.yaml\n'
  echo "pytest_add_cli_args_test_selection ="
  printf '    %s\n' "${tests[@]}"
  printf 'pytest_add_cli_args =\n    -m\n    not slow and not gpu\n    -p\n    no:cacheprovider\n    -W\n    ignore::DeprecationWarning\n'
} >"$work/setup.cfg"

cd "$work"
# one worker: the machines this runs on are shared
nice -n 10 mutmut run --max-children 1 "$@"
echo
mutmut results  # the survivors (TESTING.md explains each)
echo "nanogpt/$module.py: $(mutmut results --all true | awk -F': ' '{print $NF}' | sort | uniq -c | xargs)"
