# sluice — everyday commands. `make help` lists them.
SHELL := /bin/bash
CONFIG ?= config/dev.toml
CARGO ?= cargo
SLUICE := target/debug/sluice

.PHONY: help prereqs up down status schema sweep build run test unit fuzz fmt lint bench

help: ## this list
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-8s %s\n", $$1, $$2}'

prereqs: ## install the Debian packages the build and the stack need
	@compose/native/prereqs

up: prereqs ## start RabbitMQ, Kafka, Apicurio and Cassandra (installs what is missing)
	@compose/native/up

down: ## stop the stack (data is kept under .state/)
	@compose/native/down

status: ## one line per server
	@compose/native/status

build: prereqs ## build every crate and the sluice binary
	$(CARGO) build --workspace

schema: up ## create the CQL keyspace, tables and columns where missing (sluice schemas apply)
	$(CARGO) build -p sluice-cli
	$(SLUICE) --config $(CONFIG) schemas apply

run: schema build ## the stack plus every sluice role with the demo config, in the foreground
	$(SLUICE) --config $(CONFIG) serve --role all

sweep: up ## remove what earlier test and bench runs left in the stack (their tables, queues and topics)
	$(CARGO) run -q -p sluice-tests --bin sweep_leftovers

test: schema sweep ## start the stack if needed and run every test (the schema applied, the binary built)
	$(CARGO) test --workspace --no-fail-fast

bench: schema sweep ## release build, then `sluice bench` (full mode, a few minutes) with $(CONFIG)
	$(CARGO) build --release -p sluice-cli
	target/release/sluice --config $(CONFIG) bench $(BENCH_ARGS)

unit: ## the tests that need no server
	$(CARGO) test --workspace --lib
	$(CARGO) test -p sluice-schemas --test properties

FUZZ_SECONDS ?= 60
fuzz: ## every fuzz target for FUZZ_SECONDS each (nightly and cargo-fuzz, installed if missing)
	@rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
	@command -v cargo-fuzz >/dev/null || $(CARGO) install --locked cargo-fuzz
	cd fuzz && for target in $$($(CARGO) +nightly fuzz list); do \
	  $(CARGO) +nightly fuzz run $$target -- -max_total_time=$(FUZZ_SECONDS) || exit 1; \
	done

fmt: ## format the code
	$(CARGO) fmt --all

lint: ## formatting and clippy, warnings as errors
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
