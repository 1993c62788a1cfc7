# Two commands from a fresh clone (Python 3.11, x86_64, no GPU needed):
#   make serve   install into .venv, import the sample datastore, start the MONAI Label server
#   make test    install into .venv and run the whole test suite
VENV ?= .venv
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 8000
STUDIES ?= .data/sample_datastore
# torch's OpenMP threads sleep instead of spinning between parallel regions: a server answering while its training
# subprocess runs, or two test workers, no longer steal each other's cores (scripts/bench_contention.py)
export OMP_WAIT_POLICY ?= PASSIVE
# test files run in TEST_WORKERS processes (pytest-xdist), a file to a worker, the longest first (tests/conftest.py);
# TEST_WORKERS=0 runs them in this process, one after another
TEST_WORKERS ?= 2
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: setup serve test bench orthanc-demo

setup:
	@bash scripts/setup.sh

$(STUDIES)/datastore_v2.json:
	$(PY) scripts/import_hc18.py apps/fetal_head/sample_data $(STUDIES)

serve: setup $(STUDIES)/datastore_v2.json
	monailabel start_server --app apps/fetal_head --studies $(STUDIES) --host $(HOST) --port $(PORT)

test: setup
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

bench: setup
	$(PY) scripts/bench_latency.py

# a loopback Orthanc (DICOMweb) on :8042 with the sample images as US DICOM; prints the server command
orthanc-demo: setup
	bash scripts/orthanc_demo.sh
