# Settings of the Makefile's experiment targets; override any on the command line,
# e.g. `make sweep CAPACITIES=8:64:8 SCOPES=layer,global`.

# the default pair: held-out routing of the toy MoE trained here (make toy-model), before
# and after ReMoE router fine-tuning (make remoe-experiment)
BASE_TRACE ?= traces/toy-baseline.parquet
REMOE_TRACE ?= traces/toy-remoe.parquet
# the synthetic pair: sticky synthetic routing and its offline ReMoE-like rerouting
SAMPLE_TRACE ?= traces/sample-synthetic.parquet
REROUTED_TRACE ?= traces/sample-rerouted.parquet
# how traces/sample-rerouted.parquet was made from the baseline (make sample-traces)
REROUTE_ARGS ?= --mode recent --bias 1.0 --window 1 --label remoe-emulated

RESULTS ?= results
POLICIES ?= lru,lfu,fifo,opt,opt-bypass
SCOPES ?= layer
CAPACITIES ?= 4:32:2
BANDWIDTH ?= 4GB/s
COMPARE_CAPACITIES ?= 8,12,16
COMPARE_BANDWIDTHS ?= ufs4,nvme4,pcie4x16
# decode time of the compare rows: the toy traces with a real model's expert sizes (an
# illustration, README "Decode time") on a hardware profile (moecache profiles)
MODEL ?= deepseek-v2-lite
DTYPE ?= q4_k
HARDWARE ?= jetson-orin-nx-16gb
BOOTSTRAP ?= 0
