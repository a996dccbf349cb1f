# attnchain: the two set-up-and-run commands of README.md.
#   make book   set everything up, execute the chapters once, build the book into _build/html
#   make test   set everything up, run every test: unit and property tests, the chapters (nbmake),
#               the book build with warnings as errors, and a headless-browser check of the site
# Both start from nothing on a fresh machine: a virtual environment in .venv, torch as the
# environment notes prescribe, the package with its extras, MathJax for offline pages.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SRC := _book
MATHJAX := 3.2.2

# Chapters and tests run in the offline profile unless told otherwise; the built book shows static
# figures in place of live widgets.
export ATTNCHAIN_PROFILE ?= offline
export ATTNCHAIN_STATIC := 1
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export PYDEVD_DISABLE_FILE_VALIDATION := 1
# Per-checkout cache of long evaluations (chapter 7), so a fresh clone computes everything anew.
export ATTNCHAIN_CACHE ?= $(CURDIR)/_build/cache

.PHONY: book test setup sources unit strict minimums chapters html browser clean

book: setup chapters html

test: setup unit strict minimums chapters html browser

setup: $(VENV)/.installed $(SRC)/_vendor/mathjax/tex-chtml.js

# torch first, from the build the environment notes name for this processor; then the package,
# with the book toolchain held at the versions in constraints/book.txt.
$(VENV)/.installed: pyproject.toml constraints/book.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	if [ "$$(uname -m)" = aarch64 ]; then \
	  $(PY) -m pip install -q torch==2.9.1 torchvision==0.24.1; \
	else \
	  $(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1; \
	fi
	$(PY) -m pip install -q -e ".[test]" -c constraints/book.txt
	touch $@

# A copy of the book's sources (outside _build, which nbmake skips), so executing the chapters
# never writes outputs into notebooks/.
$(SRC)/_vendor/mathjax/tex-chtml.js:
	mkdir -p $(SRC)/_vendor/mathjax _build/cache
	[ -f _build/cache/mathjax-$(MATHJAX).tgz ] || (cd _build/cache && npm pack --silent mathjax@$(MATHJAX))
	tar -xzf _build/cache/mathjax-$(MATHJAX).tgz -C $(SRC)/_vendor/mathjax --strip-components=2 package/es5

sources:
	mkdir -p $(SRC)
	rm -rf $(SRC)/book $(SRC)/notebooks
	cp -r _config.yml _toc.yml book notebooks $(SRC)/

# Tests, chapters and strict runs go two at a time (one per core), each with one intra-op thread:
# two processes of two torch threads on two cores spin-wait on each other (measured on four test
# files: 137 s with two threads each, 29 s with one).
PAR := OMP_NUM_THREADS=1 $(PY) -m pytest -n 2 --dist worksteal

unit: setup
	$(PAR) -q tests --ignore=tests/test_book.py \
	  --ignore=tests/test_chapters_strict_cuda.py --doctest-modules attnchain

# Every chapter in the full profile on a simulated Colab GPU (attnchain.testing.strict_cuda):
# random-weight stand-ins of the paper's backbones, CUDA's device rules enforced on the CPU.
strict: setup
	$(PAR) -q -s --durations=0 tests/test_chapters_strict_cuda.py

# The capture adapters at the lowest versions pyproject.toml admits for timm, transformers and
# diffusers: a second environment that takes everything else from .venv. transformers 5.0 imports
# `kernels` when present, and kernels >= 0.15 (which .venv's newer transformers pulls in) breaks
# that import, so the second environment holds the kernels of transformers 5.0's time.
minimums: setup
	rm -rf $(VENV)-min && $(PYTHON) -m venv $(VENV)-min
	$(PY) -c "import sysconfig; print(sysconfig.get_paths()['purelib'])" \
	  > "$$($(VENV)-min/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/base.pth"
	$(VENV)-min/bin/pip install -q $$($(PY) -c "import tomllib, re; \
	  deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; \
	  print(' '.join(re.sub('>=', '==', d) for d in deps if d.split('>')[0] in ('timm', 'transformers', 'diffusers')))") \
	  "kernels<0.15"
	PYTHONPATH=$(CURDIR) $(VENV)-min/bin/python -m pytest -q -p no:cacheprovider \
	  tests/test_capture.py tests/test_capture_diffusers.py tests/test_strict_cuda.py

chapters: setup sources
	$(PAR) -q --durations=0 --nbmake --nbmake-timeout=600 --overwrite $(SRC)/notebooks

html: setup
	$(VENV)/bin/jupyter-book build -W --keep-going $(SRC) --path-output .

browser: setup
	if ! command -v chromium >/dev/null; then apt-get update -qq && apt-get install -y -qq chromium >/dev/null; fi
	$(PY) -m pytest -q tests/test_book.py

clean:
	rm -rf _build
