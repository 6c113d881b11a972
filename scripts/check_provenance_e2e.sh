#!/bin/bash
# End to end on real parts, the README's provenance tour: `serve --watermark` (defaults) behind `guard --watermark
# --shadow`; account lab harvests 12 ShareGPT dev prompts greedily (T 0), account other the next 12 at T 0.7, each
# through its own key; then `provenance text` on each harvest against every key in the guard's log, three ways:
# weighted at the temperatures the harvest recorded (the default), counted (--score count), and weighted with the
# temperatures dropped (1 assumed). Prints, per way, the pooled best key and the answers detected alone at 1e-5.
#
#   python scripts/exp_provenance.py prompts            # once: runs/provenance/prompts.json (ShareGPT, allowed half)
#   STILLHOUSE_WATERMARK_SECRET=any-fixed-secret scripts/check_provenance_e2e.sh   # OUT=runs/provenance-e2e
#   SCHEME=exp ...   # serve --watermark-scheme exp: lab's greedy answers keep the green lists, other's sampled ones
#                    # are drawn by EXP; provenance text --scheme exp tests each answer by its own scheme
#
# About 2 minutes on 2 cores (docs/results.md, "the weighted score").
set -e
cd "$(dirname "$0")/.."
S=${OUT:-runs/provenance-e2e}; rm -rf "$S"; mkdir -p "$S"
SCHEME=${SCHEME:-kgw}
: "${STILLHOUSE_WATERMARK_SECRET:?set it to any fixed secret (guard, serve and the test share it)}"
export STILLHOUSE_GUARD_ADMIN_TOKEN=e2e-admin-token-xyz
export OMP_NUM_THREADS=1
.venv/bin/python -c "
import json; d=json.load(open('runs/provenance/prompts.json'))
for name, part in (('lab', d[0:12]), ('other', d[12:24])):
    open('$S/'+name+'.jsonl','w').write(''.join(json.dumps({'messages':[{'role':'user','content':p}]})+'\n' for p in part))"
.venv/bin/stillhouse serve --teacher bundled --port 8941 --watermark --watermark-scheme $SCHEME --threads 2 > $S/serve.log 2>&1 &
SP=$!
.venv/bin/stillhouse guard --upstream http://127.0.0.1:8941 --port 8942 --db sqlite:///$S/guard.db --watermark --shadow > $S/guard.log 2>&1 &
GP=$!
trap "kill $SP $GP 2>/dev/null || true" EXIT
for i in $(seq 60); do curl -sf http://127.0.0.1:8941/health >/dev/null && curl -sf http://127.0.0.1:8942/health > /dev/null && break; sleep 2; done
for a in lab:0 other:0.7; do
  n=${a%%:*}; t=${a##*:}
  .venv/bin/stillhouse guard admin create-account --account-id $n --org "$n" --url http://127.0.0.1:8942 > /dev/null
  K=$(.venv/bin/stillhouse guard admin issue-key $n --url http://127.0.0.1:8942 | grep -o 'sk-sh-[A-Za-z0-9_-]*' | head -1)
  STILLHOUSE_API_KEY=$K .venv/bin/stillhouse harvest --prompts $S/$n.jsonl --teacher http://127.0.0.1:8942/v1 \
      --out $S/h-$n --temperature $t --max-tokens 200 --seed 0 --no-progress -c 12
done
kill $SP $GP; wait $SP $GP 2>/dev/null || true
for n in lab other; do
  for mode in "recorded:" "count:--score count" "assume1:--temperature 1"; do
    m=${mode%%:*}; extra=${mode#*:}
    src=$S/h-$n
    if [ $m = assume1 ]; then  # the same answers without their recorded temperature
      .venv/bin/python -c "
from stillhouse.provenance.texts import load_samples; import json
print(''.join(json.dumps({'messages': s.prompt + [{'role': 'assistant', 'content': s.text}], 'token_ids': s.token_ids})+'\n' for s in load_samples('$S/h-$n')), end='')" > $S/$n-notemp.jsonl
      src=$S/$n-notemp.jsonl
    fi
    .venv/bin/stillhouse provenance text $src --log sqlite:///$S/guard.db --per-sample --scheme $SCHEME $extra --json --out $S/prov-$n-$m.json > /dev/null 2>&1
    .venv/bin/python -c "
import json; r=json.load(open('$S/prov-$n-$m.json'))
own='account/$n/0'
ps=[next(x for x in p['scores'] if x['key_id'].startswith('account/$n/'))['log10_p'] for p in r['per_sample']]
import statistics
print('$n $m', 'pooled best', r['best']['key_id'], round(r['best']['log10_p'],1), 'per-answer p<1e-5:', sum(p < -5 for p in ps), '/', len(ps), 'median log10p', round(statistics.median(ps),2), r.get('weight_temperatures'), r['test'])"
  done
done
