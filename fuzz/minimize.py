"""Shrink a fuzz corpus to a small set keeping (almost) all its edges: a greedy set cover, best new edges
per byte first, within a byte budget. Keeps every file of SEED_DIR (the committed, named seeds and crash-*
regressions). Input: a libFuzzer merge control file, made by
  TMPDIR=/dev/shm LD_LIBRARY_PATH=libtorch/lib fuzz/target/x86_64-unknown-linux-gnu/release/<t> -merge=1 \\
    -merge_control_file=CF -use_counters=0 EMPTY_DIR fuzz/corpus/<t> /tmp/alloc-moe-fuzz/<t>
Usage: python3 fuzz/minimize.py CF fuzz/corpus/<t> OUT_DIR [BUDGET_BYTES]; then replace fuzz/corpus/<t> by OUT_DIR.
"""
import sys, os, shutil, hashlib
cf, seeddir, out = sys.argv[1], sys.argv[2], sys.argv[3]
budget = int(sys.argv[4]) if len(sys.argv) > 4 else 10**12
lines = open(cf).read().split('\n')
n = int(lines[0]); paths = lines[2:2+n]
cov = {}
for l in lines[2+n:]:
    if l.startswith('COV '):
        parts = l.split(); cov[int(parts[1])] = set(parts[2:])
size = {i: os.path.getsize(p) for i, p in enumerate(paths)}
all_edges = set().union(*cov.values())
covered = set(); chosen = []
# Keep the committed seeds (named, hand-written regression inputs).
for i, p in enumerate(paths):
    if p.startswith(seeddir):
        chosen.append(i); covered |= cov.get(i, set())
remaining = {i for i in cov if i not in chosen}
used = sum(size[i] for i in chosen)
while True:
    best, score = None, 0
    for i in remaining:
        g = len(cov[i] - covered)
        if g and used + size[i] <= budget:
            s = g / (size[i] + 64)
            if s > score: best, score = i, s
    if best is None: break
    chosen.append(best); covered |= cov[best]; remaining.discard(best); used += size[best]
os.makedirs(out, exist_ok=True)
total = 0
for i in chosen:
    p = paths[i]; data = open(p, 'rb').read(); total += len(data)
    name = os.path.basename(p) if p.startswith(seeddir) else hashlib.sha1(data).hexdigest()
    shutil.copy(p, os.path.join(out, name))
print(f"{len(chosen)} files, {total} bytes, {len(covered)}/{len(all_edges)} edges")
