#!/bin/bash
# Pre-authentication comparison matrix: 3 traces x 2 RTTs x 3 budgets, four modes each.
# OUT: output folder (default /tmp/preauth). EXTRA: more netsim arguments, e.g. for services
# that require tokens: EXTRA="--set services.providers=1 --set services.require_token=true".
cd "$(dirname "$0")/../.."
B=./target/release/netsim
T=../shared/data/traces
mkdir -p "${OUT:-/tmp/preauth}"
for tr in boutique trainticket nasa-jul; do
  speed=1; [ $tr = nasa-jul ] && speed=10
  for rtt in 20 80; do
    for b in 1 3 5; do
      out=${OUT:-/tmp/preauth}/$tr-$rtt-$b
      /usr/bin/time -f "%e s %M KiB" $B compare netsim/scenarios/preauth.toml --mode reactive --mode pool --mode predictive --mode oracle \
        --set workload.trace=$T/$tr.csv.gz --set workload.trace_speed=$speed --set links.rtt_ms=$rtt --set preauth.budget=$b $EXTRA \
        --json $out.json --md $out.md $( [ $b = 3 ] && echo --svg ${OUT:-/tmp/preauth}/svg-$tr-$rtt ) > $out.log 2>&1
      echo "$tr $rtt $b done $(tail -1 $out.log)"
    done
  done
done
echo ALLDONE
