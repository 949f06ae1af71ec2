# rbr: PGXS build. `make demo` and `make test` also work on a fresh machine
# before pg_config exists: they install what is missing first (test/setup.sh).

EXTENSION = rbr
EXTVERSION = 0.4.0

MODULE_big = rbr
OBJS = src/rbr.o src/jsonutil.o src/policy.o src/classes.o src/reward.o \
       src/rowset.o src/fit_solver.o src/fit.o src/model.o src/evaluate.o \
       src/grader.o src/http.o src/cache.o src/generator.o src/synth.o \
       src/secrets.o src/owner.o src/runs.o src/cost.o src/nodes.o \
       src/fit_scaleout.o src/fit_options.o src/batch.o src/ratelimit.o src/jsonc.o

DATA = sql/rbr--0.1.0.sql sql/rbr--0.1.0--0.2.0.sql sql/rbr--0.2.0--0.3.0.sql sql/rbr--0.3.0--0.4.0.sql sql/rbr--$(EXTVERSION).sql

# pg_regress suites: sql/<name>.sql -> expected/<name>.out
REGRESS = policy classes gold reward fit evaluate grader grader_report safety curation synthesize pictures citus \
          fit_scaleout
REGRESS_OPTS = --inputdir=. --load-extension=rbr

PG_CFLAGS = -std=gnu99 -Wall -Wextra -Werror
# the server headers are not -Wextra clean: include them as system headers
PG_CPPFLAGS = -isystem $(shell $(PG_CONFIG) --includedir-server 2>/dev/null)
SHLIB_LINK = -lcurl -ljson-c

EXTRA_CLEAN = results regression.diffs regression.out test/bench/*.o

PG_CONFIG ?= pg_config
PGXS := $(shell $(PG_CONFIG) --pgxs 2>/dev/null)
ifneq ($(PGXS),)
include $(PGXS)
# every object depends on the project's headers (PGXS tracks none)
$(OBJS): $(wildcard src/*.h)
else
all:
	@echo "pg_config not found: install postgresql-server-dev-15, or run 'make test' / 'make demo' (they install it)" >&2
	@exit 1
endif

.PHONY: demo test
# Set up a fresh machine if needed, build, install, start a throwaway cluster, run the demo.
demo:
	bash test/run.sh demo

# The same set-up, then every test suite.
test:
	bash test/run.sh test
