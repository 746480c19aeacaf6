# issue 7: data-parallel training on 2 H100s against 1 GPU of the same machine
source .devdata/setup.sh
unset PYTHONDONTWRITEBYTECODE; export PYTHONPYCACHEPREFIX=/tmp/pyc
env | grep -E "NCCL|MULTICAST|NVLS" | sort; nvidia-smi topo -m | head -4
R=$OUT/results; mkdir -p $R; B="timeout 170 python3 -m benchmarks.train --results $R"
run() { n=$1; shift; $B --name "$n" "$@" > $R/$n.log 2>&1; echo "rc=$? $(tail -1 $R/$n.log | cut -c1-330)"; }
W="--set train.max_iters=60 --set train.eval_interval=30"
run warm-1gpu $W
run warm-2gpu --nproc 2 $W
run x2-1gpu-b64 --set train.max_iters=1000
run x2-2gpu-b32 --nproc 2 --set train.batch_size=32 --set train.max_iters=1000
run x2-2gpu-b64 --nproc 2 --set train.max_iters=800 --set train.learning_rate=0.0015 --set train.muon_learning_rate=0.025
run x2-1gpu-b128 --set train.batch_size=128 --set train.max_iters=800 --set train.learning_rate=0.0015 --set train.muon_learning_rate=0.025
L="--set model.n_layer=12 --set model.n_head=12 --set model.n_embd=768 --set train.max_iters=300 --set train.eval_interval=100"
run x2-1gpu-L12 $L
run x2-2gpu-L12 --nproc 2 $L
# two "hosts" (separate folders, one GPU each): only node 0's folder may receive outputs
for h in 0 1; do mkdir -p /tmp/host$h/data && sed -e "s/^  max_iters: .*/  max_iters: 200/" params.yaml > /tmp/host$h/params.yaml && cp data/train.pt data/val.pt data/vocab.json /tmp/host$h/data/; done
touch /tmp/marker; sleep 1
for h in 0 1; do (cd /tmp/host$h && CUDA_VISIBLE_DEVICES=$h timeout 120 python3 -m torch.distributed.run --nnodes=2 --node_rank=$h --nproc_per_node=1 --master_addr=127.0.0.1 --master_port=29533 -m stages.train 2>&1 | tail -2 > $R/host$h.log) & done; wait
echo "files written after the launch:"; find /tmp/host0 /tmp/host1 -newer /tmp/marker -type f | sort | tee $R/two-hosts-files.txt; cat $R/host0.log
# the documented multi-GPU pipeline: train's cmd through torchrun, the real dvc
mkdir -p /tmp/bin && printf '#!/bin/sh\nexec python3 "$@"\n' > /tmp/bin/python && chmod +x /tmp/bin/python && export PATH=/tmp/bin:$PATH
P=/tmp/pipe; mkdir -p $P && cp -r dvc.yaml params.yaml stages nanogpt .dvc .dvcignore .gitignore pyproject.toml $P/ && mkdir -p $P/data $P/out $P/metrics && cp data/.gitignore $P/data/ && cp out/.gitignore $P/out/
cd $P && git init -q && export GIT_AUTHOR_NAME=bench GIT_AUTHOR_EMAIL=b@b GIT_COMMITTER_NAME=bench GIT_COMMITTER_EMAIL=b@b
sed -i "s#^  url: .*#  url: file://$OLDPWD/.devdata/input.txt#" params.yaml
sed -i "s#cmd: python -m stages.train#cmd: torchrun --standalone --nproc_per_node=2 -m stages.train#" dvc.yaml
git add -A && git commit -qm init && grep -n torchrun dvc.yaml
timeout 140 dvc repro > $R/dvc-torchrun.log 2>&1; echo "dvc rc=$?"; grep -v "^step\|^ *[0-9]" $R/dvc-torchrun.log | tail -12; dvc metrics show --md 2>&1 | tee $R/dvc-metrics.md
