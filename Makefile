# nsbuild: set-up, example and tests.
#
#   make example   install what is missing, build fixtures/example into example.tar and run it
#   make test      install what is missing, create the test accounts, lint, run the whole test suite
#
# Both work on a fresh Debian 12 machine.  As root they install the system packages and create the
# test accounts; as any other user they name what is missing and how to install it, and stop.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help
.DELETE_ON_ERROR:

# Debian's interpreter on purpose: the default python3 on our machines lives under /root (mode 0700),
# so neither it nor a venv made from it can be executed by the unprivileged test accounts.
PYTHON ?= /usr/bin/python3

# The verifiers of ../shared/VERIFIERS.md, what python-prctl and nsbuild's C tar loop need to build
# (libcap-dev, gcc, python3-dev), the venv, compressors, and openssl (the registry tests make a throw-away CA).
# Installed with their recommends, as VERIFIERS.md does: rootless podman wants catatonit,
# slirp4netns and fuse-overlayfs from there.
# nix-bin: the real Nix that checks includeNixDB's database; docker.io: a private dockerd for the
# `docker load` checks (root only: as anyone else they are skipped). Their recommends would pull in
# systemd units.
DEB_NO_RECOMMENDS := nix-bin docker.io
DEB_PACKAGES := nix-bin $(if $(filter 0,$(shell id -u)),docker.io) skopeo umoci oci-image-tool podman buildah runc uidmap fakeroot libarchive-tools \
	busybox-static mmdebstrap ninja-build docker-registry attr libcap-dev python3-venv python3-dev gcc zstd pigz openssl

TEST_USER := nsbuild-test
NOSUB_USER := nsbuild-nosub
# Size of the subordinate id range nsbuild-test must have (a full 16-bit id space, like useradd's default).
SUBID_COUNT := 65536

UID_NOW := $(shell id -u)

# Where the venv lives and how the project is installed into it.
#
# Tests run `$(VENV)/bin/nsbuild` as the unprivileged accounts nsbuild-test and nsbuild-nosub, so the
# venv and, for an editable install, the project sources must be reachable by "others": every parent
# directory of the project needs o+x and the sources o+r.  When that holds, the venv is the usual
# .venv with an editable install.  When it does not (e.g. a clone under /root, mode 0700, or a
# checkout made with umask 077), the venv goes to /var/tmp/nsbuild-venv-UID with a NON-editable
# install (the sources are copied into the venv's site-packages), reinstalled on every run so it
# never tests stale code.  `make VENV=...` overrides the location; the install kind still follows
# the reachability of the project.
PROJECT_SHARED := $(shell \
	d='$(CURDIR)'; ok=yes; \
	while :; do \
	  [ -n "$$(find "$$d" -maxdepth 0 -perm -o=x 2>/dev/null)" ] || ok=no; \
	  [ "$$d" = / ] && break; d=$$(dirname "$$d"); \
	done; \
	if [ -n "$$(find '$(CURDIR)/nsbuild' '$(CURDIR)/pyproject.toml' \
	      \( -type d ! -perm -o=rx \) -o \( -type f ! -perm -o=r \) 2>/dev/null | head -n1)" ]; then \
	  ok=no; fi; \
	echo $$ok)

ifeq ($(PROJECT_SHARED),yes)
VENV ?= .venv
INSTALL_KIND := editable
else
VENV ?= /var/tmp/nsbuild-venv-$(UID_NOW)
INSTALL_KIND := copy
endif

NSBUILD := $(VENV)/bin/nsbuild
LINT_PATHS := $(wildcard nsbuild tests bench)
PYTEST_ARGS ?=

.PHONY: help deps venv test-users lint test example clean

help:
	@echo "make example   build fixtures/example/spec.json into example.tar and run it"
	@echo "make test      lint and run the whole test suite (PYTEST_ARGS='...' passes arguments to pytest)"
	@echo "make deps | venv | test-users | lint | clean"
	@echo "venv: $(VENV) ($(INSTALL_KIND) install; project reachable by other users: $(PROJECT_SHARED))"

# ---------------------------------------------------------------------------------------------------
# System packages.  dpkg-query decides what is missing, so a machine that has everything costs one
# dpkg-query call; `apt-get update` runs only when something has to be installed.
deps:
	@missing=$$(dpkg-query -W -f='$${Package} $${Status}\n' $(DEB_PACKAGES) 2>/dev/null \
	  | awk '$$NF == "installed" && $$(NF-1) == "ok" {ok[$$1] = 1} \
	         END {n = split("$(DEB_PACKAGES)", want, " "); for (i = 1; i <= n; i++) if (!(want[i] in ok)) printf " %s", want[i]}' \
	  || true); \
	if [ -z "$$missing" ]; then echo "deps: all Debian packages present"; exit 0; fi; \
	if [ "$(UID_NOW)" = 0 ]; then \
	  echo "deps: installing:$$missing"; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get update -q; \
	  norec=""; rec=""; \
	  for p in $$missing; do case " $(DEB_NO_RECOMMENDS) " in *" $$p "*) norec="$$norec $$p";; *) rec="$$rec $$p";; esac; done; \
	  if [ -n "$$rec" ]; then apt-get install -y -q $$rec; fi; \
	  if [ -n "$$norec" ]; then apt-get install -y -q --no-install-recommends $$norec; fi; \
	else \
	  echo "deps: these Debian packages are missing:$$missing" >&2; \
	  echo "deps: install them as root with:" >&2; \
	  echo "    apt-get update && apt-get install -y$$missing" >&2; \
	  exit 1; \
	fi

# ---------------------------------------------------------------------------------------------------
# The venv.  Recreated when it was not made from $(PYTHON) (e.g. an old .venv made from the /root
# python), reinstalled when pyproject.toml, setup.py or a C extension's source changed (editable: the
# extensions are built by the install) or on every run (copy install).
# umask 022 so that everything pip writes is readable by the test accounts.
venv: deps
	@umask 022; \
	base=$$($(PYTHON) -c 'import sys; print(sys.base_prefix)'); \
	if [ -x '$(VENV)/bin/python' ] && \
	   [ "$$('$(VENV)/bin/python' -c 'import sys; print(sys.base_prefix)' 2>/dev/null)" != "$$base" ]; then \
	  echo "venv: $(VENV) was not made from $(PYTHON); recreating it"; rm -rf '$(VENV)'; \
	fi; \
	if ! '$(VENV)/bin/python' -m pip --version >/dev/null 2>&1; then \
	  echo "venv: creating $(VENV) from $(PYTHON)"; \
	  rm -rf '$(VENV)'; \
	  $(PYTHON) -m venv '$(VENV)' || { rm -rf '$(VENV)'; echo "venv: $(PYTHON) -m venv failed" >&2; exit 1; }; \
	fi; \
	stamp='$(VENV)/.nsbuild-installed'; \
	if [ '$(INSTALL_KIND)' = editable ]; then \
	  if [ ! -e "$$stamp" ] || [ pyproject.toml -nt "$$stamp" ] || [ setup.py -nt "$$stamp" ] \
	     || [ -n "$$(find nsbuild -name '*.c' -newer "$$stamp")" ] || ! '$(VENV)/bin/python' -c 'import nsbuild' 2>/dev/null \
	     || [ ! -x '$(NSBUILD)' ]; then \
	    echo "venv: editable install of $(CURDIR) with extras [test]"; \
	    '$(VENV)/bin/python' -m pip install -q -e '.[test]'; \
	    touch "$$stamp"; \
	  fi; \
	else \
	  echo "venv: $(CURDIR) is not reachable by other users: installing a copy into $(VENV)"; \
	  '$(VENV)/bin/python' -m pip install -q '.[test]'; \
	  '$(VENV)/bin/python' -m pip install -q --force-reinstall --no-deps --no-cache-dir . ; \
	  touch "$$stamp"; \
	fi; \
	chmod -R o+rX '$(VENV)'

# ---------------------------------------------------------------------------------------------------
# Test accounts (root only; idempotent).
#   nsbuild-test:  a normal account with a subordinate id range of at least $(SUBID_COUNT) ids in both
#                  /etc/subuid and /etc/subgid (the "userns" backend's case).
#   nsbuild-nosub: an account with no line at all in /etc/subuid and /etc/subgid (no newuidmap ranges:
#                  the single-id namespace and fakeroot cases).
# A range is added after the highest range in use, so it never overlaps another account's.
test-users:
	@if [ "$(UID_NOW)" != 0 ]; then \
	  echo "test-users: not root; tests run as $$(id -un) only (the per-account cases are skipped)"; exit 0; \
	fi; \
	touch /etc/subuid /etc/subgid; \
	for u in $(TEST_USER) $(NOSUB_USER); do \
	  if ! getent passwd "$$u" >/dev/null; then \
	    echo "test-users: useradd -m $$u"; useradd -m -s /bin/bash "$$u"; \
	  fi; \
	done; \
	for f in /etc/subuid /etc/subgid; do \
	  uid=$$(id -u $(NOSUB_USER)); \
	  if grep -Eq "^($(NOSUB_USER)|$$uid):" "$$f"; then \
	    echo "test-users: removing $(NOSUB_USER)'s ranges from $$f"; \
	    sed -i -E "/^($(NOSUB_USER)|$$uid):/d" "$$f"; \
	  fi; \
	  uid=$$(id -u $(TEST_USER)); \
	  have=$$(awk -F: -v u=$(TEST_USER) -v n="$$uid" '$$1==u || $$1==n {s+=$$3} END {print s+0}' "$$f"); \
	  if [ "$$have" -lt $(SUBID_COUNT) ]; then \
	    start=$$(awk -F: 'BEGIN {m=100000} NF>=3 && $$2+$$3>m {m=$$2+$$3} END {print m}' "$$f"); \
	    echo "test-users: $(TEST_USER):$$start:$(SUBID_COUNT) -> $$f"; \
	    echo "$(TEST_USER):$$start:$(SUBID_COUNT)" >> "$$f"; \
	  fi; \
	done; \
	echo "test-users: $(TEST_USER) ($$(grep "^$(TEST_USER):" /etc/subuid | tr '\n' ' ')) and $(NOSUB_USER) (no subordinate ids) ready"

# ---------------------------------------------------------------------------------------------------
lint: venv
	'$(VENV)/bin/ruff' check $(LINT_PATHS)

# Lint and tests both run, so one report shows both; the target fails if either failed (pytest's
# exit 5, "no tests collected", is a failure too).
test: deps venv test-users
	@lint=0; tests=0; \
	echo "+ $(VENV)/bin/ruff check $(LINT_PATHS)"; '$(VENV)/bin/ruff' check $(LINT_PATHS) || lint=$$?; \
	echo "+ $(VENV)/bin/ruff format --check $(LINT_PATHS)"; '$(VENV)/bin/ruff' format --check $(LINT_PATHS) || lint=$$?; \
	echo "+ $(VENV)/bin/mypy"; '$(VENV)/bin/mypy' || lint=$$?; \
	echo "+ $(VENV)/bin/pytest $(PYTEST_ARGS)"; '$(VENV)/bin/pytest' $(PYTEST_ARGS) || tests=$$?; \
	if [ $$lint != 0 ]; then echo "test: ruff or mypy failed (exit $$lint)" >&2; fi; \
	if [ $$tests != 0 ]; then echo "test: pytest failed (exit $$tests)" >&2; fi; \
	[ $$lint = 0 ] && [ $$tests = 0 ]

# ---------------------------------------------------------------------------------------------------
# The example: build, summarise, and run it with podman in a throw-away store (see
# ../shared/VERIFIERS.md for why each podman option is there).  Every command is printed.
EXAMPLE_SPEC := fixtures/example/spec.json
EXAMPLE_OUT := example.tar

example: deps venv
	@run() { printf '+ %s\n' "$$*"; "$$@"; }; \
	run '$(NSBUILD)' layered $(EXAMPLE_SPEC) -o $(EXAMPLE_OUT); \
	run '$(NSBUILD)' inspect $(EXAMPLE_OUT); \
	if ! command -v podman >/dev/null; then echo "example: podman not installed; not running the image"; exit 0; fi; \
	store=$$(mktemp -d /var/tmp/nsbuild-example.XXXXXX); \
	printf '[containers]\ndefault_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]\nnetns = "none"\n[engine]\nruntime = "runc"\ncgroup_manager = "cgroupfs"\nevents_logger = "file"\n' \
	  > "$$store/containers.conf"; \
	echo '{}' > "$$store/auth.json"; \
	export CONTAINERS_CONF="$$store/containers.conf" REGISTRY_AUTH_FILE="$$store/auth.json"; \
	if [ "$(UID_NOW)" != 0 ]; then mkdir -m 0700 "$$store/xdg"; export XDG_RUNTIME_DIR="$$store/xdg"; fi; \
	podman=(podman --root "$$store/root" --runroot "$$store/run" --storage-driver vfs); \
	ulimits=(); [ "$(UID_NOW)" = 0 ] && ulimits=(--ulimit nofile=1024:1024 --ulimit nproc=1024:1024); \
	cleanup() { "$${podman[@]}" system reset -f >/dev/null 2>&1 || true; rm -rf "$$store"; }; \
	trap cleanup EXIT; \
	if ! "$${podman[@]}" info >/dev/null 2>"$$store/info.err"; then \
	  echo "example: podman is not usable here, not running the image:"; cat "$$store/info.err"; exit 0; \
	fi; \
	archive=$(EXAMPLE_OUT); \
	printf '+ %s\n' "$${podman[*]} load -i $$archive"; \
	loaded=$$("$${podman[@]}" load -i "$$archive"); echo "$$loaded"; \
	image=$$(sed -n 's/^Loaded image[^:]*: *//p' <<<"$$loaded" | tail -n1); \
	run "$${podman[@]}" run --rm --pull=never --network=none --runtime runc "$${ulimits[@]}" "$$image"; \
	echo "example: $(EXAMPLE_OUT) built and ran ($$image)"

clean:
	rm -rf $(EXAMPLE_OUT) .pytest_cache .ruff_cache
