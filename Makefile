# Two commands from a fresh clone (Python 3.11, x86_64, no GPU needed):
#   make serve   install into .venv, import the sample datastore, start the MONAI Label server
#   make test    install into .venv and run the whole test suite
VENV ?= .venv
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 8000
STUDIES ?= .data/sample_datastore
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: setup serve test bench orthanc-demo

setup:
	@bash scripts/setup.sh

$(STUDIES)/datastore_v2.json:
	$(PY) scripts/import_hc18.py apps/fetal_head/sample_data $(STUDIES)

serve: setup $(STUDIES)/datastore_v2.json
	monailabel start_server --app apps/fetal_head --studies $(STUDIES) --host $(HOST) --port $(PORT)

test: setup
	$(PY) -m pytest

bench: setup
	$(PY) scripts/bench_latency.py

# a loopback Orthanc (DICOMweb) on :8042 with the sample images as US DICOM; prints the server command
orthanc-demo: setup
	bash scripts/orthanc_demo.sh
