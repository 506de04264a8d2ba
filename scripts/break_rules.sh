#!/usr/bin/env bash
# Break one μP rule at a time in a scratch copy of the committed tree and list the tests that fail.
# Every rule must be caught by at least one test; a line "caught by: none" is a gap in the suite.
# Usage: scripts/break_rules.sh   (about 15 minutes on 2 cores; needs `make install` first)
set -uo pipefail
top=$(git rev-parse --show-toplevel)
python="$top/.venv/bin/python"
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
tests="tests/test_model.py tests/test_shapes.py tests/test_settings.py tests/test_data.py tests/test_coord.py"

break_rule() {
  local name="$1" file="$2" old="$3" new="$4"
  rm -rf "$scratch/repo" && mkdir -p "$scratch/repo"
  git -C "$top" archive HEAD | tar -x -C "$scratch/repo"
  "$python" - "$scratch/repo/$file" "$old" "$new" <<'PY' || { echo "$name: pattern not found in $file"; return; }
import sys
path, old, new = sys.argv[1:]
text = open(path).read()
if old not in text:
    sys.exit(1)
open(path, "w").write(text.replace(old, new, 1))
PY
  local failed
  failed=$(cd "$scratch/repo" && "$python" -m pytest -q -p no:cacheprovider $tests 2>&1 | sed -n 's/^FAILED \([^ ]*\).*/\1/p' | tr '\n' ' ')
  echo "$name: caught by: ${failed:-none}"
}

break_rule "hidden init not scaled by 1/sqrt(m)" mup_qwen/model.py \
  "std = sigma / math.sqrt(fan_in_width_mult(parameter))" "std = sigma"
break_rule "attention scale left at 1/sqrt(head_dim)" mup_qwen/model.py \
  "module.scaling = attn_mult / module.head_dim" "module.scaling = module.head_dim**-0.5"
break_rule "readout not divided by width_mult" mup_qwen/model.py \
  "x * (self.output_mult / self.width_mult_value)" "x * self.output_mult"
break_rule "torch Adam in place of MuAdam" mup_qwen/optim.py \
  'table = MUP_OPTIMIZERS if parametrization == "mup" else SP_OPTIMIZERS' "table = SP_OPTIMIZERS"
break_rule "set_base_shapes rescales the readout" mup_qwen/shapes.py \
  "rescale_params=False)" "rescale_params=True)"
break_rule "tied readout not shared" mup_qwen/model.py \
  "readout = SharedReadout(model.get_input_embeddings().weight, **options)" \
  "readout = Readout(old.in_features, old.out_features, **options)"
break_rule "attn_mult default not sqrt(base head_dim)" mup_qwen/settings.py \
  "return math.sqrt(head_layout(model, model.base_width).head_dim)" "return 1.0"
break_rule "readout multiplier not refreshed" mup_qwen/shapes.py \
  "    refresh_readout(model)
    return model" "    return model"
break_rule "readout init shrinks with width" mup_qwen/model.py \
  '        if mup and role == "readout":' '        if role == "readout":
            std = sigma / math.sqrt(fan_in_width_mult(parameter))
        if mup and role == "readout":'
