# Settings of the Makefile's experiment targets; override any on the command line,
# e.g. `make sweep CAPACITIES=8:64:8 SCOPES=layer,global`.

# the shipped pair: synthetic baseline routing and its offline ReMoE-like rerouting
BASE_TRACE ?= traces/sample-synthetic.parquet
REMOE_TRACE ?= traces/sample-rerouted.parquet
# how traces/sample-rerouted.parquet was made from the baseline (make sample-traces)
REROUTE_ARGS ?= --mode recent --bias 1.0 --window 1 --label remoe-emulated

RESULTS ?= results
POLICIES ?= lru,lfu,fifo,opt,opt-bypass
SCOPES ?= layer
CAPACITIES ?= 8:64:4
BANDWIDTH ?= 4GB/s
COMPARE_CAPACITIES ?= 16,32
COMPARE_BANDWIDTHS ?= ufs4,nvme4,pcie4x16
COMPUTE_MS ?= 20
BOOTSTRAP ?= 0
