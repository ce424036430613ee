# The pipeline as make targets: `make` reruns a stage only when its input artifact, its code
# or its parameters changed. Running the numbered scripts by hand keeps working: make only
# looks at the manifests they write.
#
#   make demo                         # whole pipeline on the generated demo data
#   make INPUT=~/ml-100k              # stages 10-60 on your own download
#   make SPLIT=loo MODEL=neumf        # another split and model; only what changed reruns
#   make recommend USER_ID=196        # top-10 for a raw user id
#   make clean                        # remove $(DATA)
#
# Parameters (each stage's extra flags go in its *_ARGS variable):
PYTHON      ?= python3
DATA        ?= data
INPUT       ?= demo
PRE_ARGS    ?=
IDS_ARGS    ?=
SPLIT       ?= random
SPLIT_ARGS  ?=
MATRIX_ARGS ?=
MODEL       ?= mf
TRAIN_ARGS  ?=
USER_ID     ?=
K           ?= 10
REC_ARGS    ?=

COMMON  := recpipe/__init__.py recpipe/cli.py recpipe/artifacts.py recpipe/durable.py
S10 := $(DATA)/10_preprocessing/manifest.json
S20 := $(DATA)/20_make_ids/manifest.json
S30 := $(DATA)/30_split_train_test/manifest.json
S40 := $(DATA)/40_make_sparse_matrix/manifest.json
S60 := $(DATA)/60_train/$(MODEL)/manifest.json
STAMP60 := 60_$(MODEL)
P   := $(DATA)/.params

# The exact arguments of each stage; a stamp file changes only when they change.
ARGS10 := --data-dir $(DATA) --input $(INPUT) $(PRE_ARGS)
ARGS20 := --data-dir $(DATA) $(IDS_ARGS)
ARGS30 := --data-dir $(DATA) --strategy $(SPLIT) $(SPLIT_ARGS)
ARGS40 := --data-dir $(DATA) $(MATRIX_ARGS)
ARGS60 := --data-dir $(DATA) --model $(MODEL) $(TRAIN_ARGS)

.PHONY: all demo train recommend test bench clean
all: $(S60)

demo: $(S60)
	$(PYTHON) 70_recommend.py --data-dir $(DATA) --model $(MODEL) --user $(or $(USER_ID),$(shell $(PYTHON) -c "import pandas as p; print(p.read_parquet('$(DATA)/20_make_ids/users.parquet').raw_user_id.iloc[0])")) -k $(K) --explain $(REC_ARGS)

train: $(S60)

recommend: $(S60)
	$(if $(USER_ID)$(REC_ARGS),,$(error give USER_ID=RAW_USER_ID (e.g. make recommend USER_ID=196) or REC_ARGS="--batch all --out recs.csv"))
	$(PYTHON) 70_recommend.py --data-dir $(DATA) --model $(MODEL) $(if $(USER_ID),--user $(USER_ID)) -k $(K) $(REC_ARGS)

# Parameter stamps, refreshed while the Makefile is read (so `make -n` and `make -q` tell the
# truth): a stamp file is rewritten, and its stage made out of date, only when the arguments
# differ from those of the last run.
stamp = $(shell mkdir -p $(P) && printf '%s\n' '$(2)' | cmp -s - $(P)/$(1) || printf '%s\n' '$(2)' > $(P)/$(1))
ifeq ($(filter clean test bench,$(MAKECMDGOALS)),)
$(call stamp,10,$(ARGS10))$(call stamp,20,$(ARGS20))$(call stamp,30,$(ARGS30))
$(call stamp,40,$(ARGS40))$(call stamp,$(STAMP60),$(ARGS60))
endif

$(S10): 10_preprocessing.py $(COMMON) $(wildcard recpipe/preprocess.py recpipe/formats.py recpipe/readers/*.py recpipe/demo.py recpipe/download.py) $(wildcard $(INPUT)) $(P)/10
	$(PYTHON) 10_preprocessing.py $(ARGS10)

$(S20): 20_make_ids.py $(COMMON) recpipe/ids.py $(S10) $(P)/20
	$(PYTHON) 20_make_ids.py $(ARGS20)

$(S30): 30_split_train_test.py $(COMMON) recpipe/split.py recpipe/holdout.py $(wildcard recpipe/readers/*.py) $(S20) $(P)/30
	$(PYTHON) 30_split_train_test.py $(ARGS30)

$(S40): 40_make_sparse_matrix.py $(COMMON) recpipe/matrix.py $(S30) $(P)/40
	$(PYTHON) 40_make_sparse_matrix.py $(ARGS40)

$(S60): 60_train.py models.py $(COMMON) $(wildcard $(addprefix recpipe/,train.py metrics.py dataset.py presets.py family.py objectives.py scoring.py evaluation.py checkpoint.py optim.py report.py train_config.py ease.py autoencoders.py distributed.py kernels.py)) $(S40) $(P)/$(STAMP60)
	$(PYTHON) 60_train.py $(ARGS60)

test:
	$(PYTHON) -m pytest -q

bench:
	$(PYTHON) bench/bench_preprocessing.py
	$(PYTHON) bench/bench_stages_20_40.py
	$(PYTHON) bench/bench_train.py
	$(PYTHON) bench/bench_vs_surprise.py

clean:
	rm -rf $(DATA)
