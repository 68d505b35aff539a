"""Spark: the bounded SQL runs where the data lives, on a local Spark, a cluster or a Spark Connect server.

One SparkSession per gateway (config ``spark: {master, conf}``): ``local[*]`` by default, a cluster master
URL (``spark://``, ``yarn``, ``k8s://``) or a Spark Connect URL (``sc://host:15002``). The connector takes
its own session (``newSession()`` on a classic driver: the SparkContext is shared, SQL settings and temp
views are not) with ``spark.sql.ansi.enabled=false``, which the Spark hooks' proof note relies on
(connectors/spark_sql.py); the setting is checked before every query, and a config may not change it.

On a local master the JVM's scratch space (``spark.local.dir``: the shuffle files of every query, which
hold person-level rows while it runs) is a new 0700 folder unless the config or ``SPARK_LOCAL_DIRS`` names
one (Spark's default, the system's temporary folder, creates it readable by every user).

Sources: a Parquet path is read as ``parquet.`path```; a CSV path through a temp view registered by
this connector (header line, ``,`` and ``"``, every column as text, malformed records read as NULLs,
never a failure); a catalog table as ``db.table``.

Proof note (prepared copies are private and checked; dpgateway/prepare.py, passes/prepared.py): a copy holds
person-level rows, so :meth:`SparkConnector.copy_source` admits a table only when

- the master is local (``local``, ``local[N]``, ``local[*]``, with or without ``,F`` retries): the driver and
  its executors are threads of the JVM this process started, as the gateway's OS user, so the copy is
  written (:meth:`SparkConnector.materialize`, in a private scratch folder, then every file 0600 and folder
  0700) and read in the gateway's own 0700 ``cache_dir``, which nothing else needs to reach. A cluster
  (``spark://``, ``yarn``, ``k8s://``, ``local-cluster[...]``: executors are other processes, on other
  machines) or a Spark Connect server would need a path they all read, which the gateway cannot keep
  private: refused (0A000);
- the source is a path that Hadoop, with this session's configuration (``fs.defaultFS`` included), resolves
  to the local file system (scheme ``file``, one of Hadoop's local file system classes), with no glob character
  (Spark expands ``* ? [ ] { }`` and backslashes to files no single path names): the gateway then stats exactly the
  file or folder Spark lists (``prepare.path_state``: the folder and every file and folder under it,
  following links, a superset of the data files Spark reads). A catalog table, or a path on another file
  system (``s3a://``, ``hdfs://``, ...), has no stat that shows its rows changed: refused (0A000).

Tests: tests/backends/test_spark_prepare.py.

Proof note (errors carry no data): Spark messages can quote a row's value, so neither they nor the
exception text is shown; a failure is a BackendError (58000) naming only the exception class.
Test: tests/backends/test_spark.py::test_backend_error_hides_values.
"""

from __future__ import annotations

import os
import re
import tempfile
import threading
import uuid
from decimal import Decimal
from typing import Any

from sqlglot import exp

from dpgateway.connectors.base import Connector, ExactAggregates
from dpgateway.connectors.spark_sql import SparkHooks
from dpgateway.errors import BackendError, ConfigError, UnsupportedError
from dpgateway.policies.model import Config, Table
from dpgateway.sqlcheck import VerifiedSQL, verify

# Quiet, small defaults for a local master; the config's conf overrides them (never the owned setting).
LOCAL_DEFAULTS = {
    "spark.ui.enabled": "false",
    "spark.ui.showConsoleProgress": "false",
    "spark.sql.shuffle.partitions": "8",
}
OWNED = {"spark.sql.ansi.enabled": "false"}
_WITHHELD = "details are withheld because they may contain data values"
LOCAL_MASTER = re.compile(r"local(\[(\*|[1-9][0-9]*)(,[0-9]+)?\])?")  # executors: threads of this process's JVM
GLOB_CHARACTERS = frozenset("*?[]{}\\")  # Spark expands a path holding any of these as a pattern
# Hadoop's local file system classes (Spark's Hive support registers a subclass of the first for file:)
LOCAL_FILE_SYSTEMS = ("org.apache.hadoop.fs.LocalFileSystem", "org.apache.hadoop.fs.RawLocalFileSystem")
COPY_REFUSALS = {  # why a table cannot be prepared (proof note above)
    "master": (
        "the copy holds person-level rows, and only on a local master (local, local[N], local[*]) are Spark's "
        "executors threads of the gateway's own process, reading it from the gateway's private cache_dir; a "
        "cluster's executors or a Spark Connect server run elsewhere and would need a path they all read, which "
        "the gateway cannot keep private"
    ),
    "catalog": (
        "a catalog table has no file the gateway can stat to see that its rows changed, so a copy could go stale "
        "unnoticed"
    ),
    "glob": "its path is a pattern (Spark expands * ? [ ] { } \\), not one file or folder the gateway can stat",
    "remote": (
        "its path is not on the local file system as this Spark session resolves it (s3a://, hdfs://, or another "
        "fs.defaultFS), and such a store has no stat that shows its rows changed, so a copy could go stale unnoticed"
    ),
}
_lock = threading.Lock()


def spark_session(master: str = "local[*]", conf: dict[str, str] | None = None) -> Any:
    """The process's base SparkSession for ``master`` (created once; Spark Connect for an ``sc://`` URL)."""
    try:
        from pyspark.sql import SparkSession
    except ImportError:
        raise ConfigError(
            "a table has a Spark source but pyspark is not installed; pip install 'dpgateway[spark]' (needs Java 17+)"
        ) from None
    settings = {**(LOCAL_DEFAULTS if master.startswith("local") else {}), **(conf or {}), **OWNED}
    builder = SparkSession.builder.remote(master) if master.startswith("sc://") else SparkSession.builder.master(master)
    for name, value in settings.items():
        builder = builder.config(name, value)
    with _lock:
        if master.startswith("local") and "spark.local.dir" not in settings and not os.environ.get("SPARK_LOCAL_DIRS"):
            from pyspark import SparkContext

            if SparkContext._active_spark_context is None:  # starting the JVM: its scratch space, private
                builder = builder.config("spark.local.dir", tempfile.mkdtemp(prefix="dpgateway-spark-"))  # 0700
        try:
            return builder.getOrCreate()
        except Exception as exc:  # Java missing, master unreachable: the class names the cause
            raise ConfigError(
                f"cannot start Spark on master {master!r} ({type(exc).__name__}); check that Java 17+ is "
                "installed and the master URL is reachable"
            ) from None


class SparkConnector(Connector):
    """Runs verified Spark SQL on a session of its own (temp views and settings private to this gateway)."""

    hooks: SparkHooks

    def __init__(self, session: Any, tables: tuple[Table, ...] = ()) -> None:
        self.hooks = SparkHooks(prefix=uuid.uuid4().hex[:12])
        self._session = session.newSession() if hasattr(session, "newSession") else session
        for name, value in OWNED.items():
            self._session.conf.set(name, value)
        for table in tables:
            self._register(table)

    @classmethod
    def for_config(cls, config: Config) -> SparkConnector:
        """A connector on the config's ``spark`` session, with its CSV sources registered."""
        settings = config.spark or {}
        session = spark_session(settings.get("master", "local[*]"), settings.get("conf", {}))
        return cls(session, config.tables)

    def _register(self, table: Table) -> None:
        """Register a CSV source as this connector's temp view (read lazily, at each query)."""
        spec = table.source
        if not isinstance(spec, dict) or spec.get("format") != "csv":
            return
        from pyspark.sql.types import StringType, StructField, StructType

        names = [c.name for c in table.columns]
        try:
            header = self._session.read.option("header", True).csv(spec["path"]).columns
        except Exception as exc:
            raise ConfigError(
                f"tables.{table.name}.source: Spark cannot read {spec['path']!r}: {type(exc).__name__}"
            ) from None
        names = list(header) or names
        schema = StructType([StructField(n, StringType(), True) for n in names])
        frame = (
            self._session.read.schema(schema)
            .option("header", True)
            .option("mode", "PERMISSIVE")
            .option("multiLine", False)
            .csv(spec["path"])
        )
        frame.createOrReplaceTempView(self.hooks.view(table))

    def _check_owned(self) -> None:
        if str(self._session.conf.get("spark.sql.ansi.enabled")).lower() != "false":
            raise BackendError("the Spark session's spark.sql.ansi.enabled is not false; row expressions could raise")

    def _execute(self, sql: VerifiedSQL, settings: tuple[tuple[str, Any], ...] = ()) -> ExactAggregates:
        if settings:
            raise BackendError(f"setting {settings[0][0]!r} is not one the Spark backend applies (this is a bug)")
        self._check_owned()
        try:
            frame = self._session.sql(sql)
            columns = tuple(frame.columns)
            rows = tuple(tuple(_plain(v) for v in row) for row in frame.collect())
        except Exception as exc:
            raise BackendError(
                f"the backend could not run the bounded query ({type(exc).__name__}); {_WITHHELD}. Check that the "
                "policy's sources and columns match the data"
            ) from None
        return ExactAggregates(columns=columns, rows=rows)

    def _materialize(self, sql: VerifiedSQL, path: str) -> int:
        """Write the rows as a new folder of Parquet part files at ``path``, then count them from the folder."""
        self._check_owned()
        try:
            self._session.sql(sql).write.mode("errorifexists").parquet(path)
        except Exception as exc:
            raise BackendError(
                f"the backend could not write the prepared copy ({type(exc).__name__}); {_WITHHELD}"
            ) from None
        written = self.hooks.file_source(path)
        count = exp.select(exp.alias_(exp.Count(this=exp.Star()), "n")).from_(written)
        return int(self.execute(verify(count, self.hooks.DIALECT, sources=[written])).rows[0][0])

    def copy_source(self, table: Table) -> str:
        """The local file or folder of ``table``'s rows (proof note above); UnsupportedError (0A000) otherwise."""
        spec = table.source
        if not LOCAL_MASTER.fullmatch(self._master() or ""):
            why = COPY_REFUSALS["master"]
        elif not isinstance(spec, dict) or "path" not in spec:
            why = COPY_REFUSALS["catalog"]
        elif GLOB_CHARACTERS & set(spec["path"]):
            why = COPY_REFUSALS["glob"]
        else:
            local = self._local_path(spec["path"])
            if local is not None:
                return local
            why = COPY_REFUSALS["remote"]
        raise UnsupportedError(
            f"table {table.name} cannot be prepared on spark: {why}. Queries bound on the fly instead"
        )

    def _master(self) -> str | None:
        """The master URL of this classic session; None for Spark Connect (no SparkContext in this process)."""
        try:
            return str(self._session.sparkContext.master)
        except Exception:
            return None

    def _local_path(self, path: str) -> str | None:
        """The absolute path on the local file system that Hadoop, with this session's configuration, resolves
        ``path`` to (as Spark does when it reads it); None if it is on another file system."""
        try:
            jvm = self._session._jvm
            conf = self._session._jsparkSession.sessionState().newHadoopConf()
            hadoop_path = jvm.org.apache.hadoop.fs.Path(path)
            scheme = (
                hadoop_path.toUri().getScheme() or jvm.org.apache.hadoop.fs.FileSystem.getDefaultUri(conf).getScheme()
            )
            if scheme != "file":
                return None
            system = hadoop_path.getFileSystem(conf)
            if not any(jvm.java.lang.Class.forName(name).isInstance(system) for name in LOCAL_FILE_SYSTEMS):
                return None
            return str(system.makeQualified(hadoop_path).toUri().getPath())
        except Exception:  # no such file system (s3a without its jars, ...): not local
            return None

    def check_table(self, table: Table) -> None:
        """The source can be read and has every declared column (schema only: Parquet footers, the catalog)."""
        where = f"tables.{table.name}"
        if not isinstance(table.source, dict) or table.source.get("connector") != "spark":
            raise ConfigError(f"{where}.source: this gateway reads Spark; give the table a spark source")
        probe = exp.select(exp.Star()).from_(self.hooks.source(table)).limit(0).sql(dialect="spark")
        try:
            found = {name.lower() for name in self._session.sql(probe).columns}
        except Exception as exc:
            what = table.source.get("table") or table.source.get("path")
            raise ConfigError(f"{where}.source: Spark cannot read {what!r} ({type(exc).__name__})") from None
        missing = [c.name for c in table.columns if c.name.lower() not in found]
        if missing:
            raise ConfigError(
                f"{where}.columns: {', '.join(missing)} not found in the source; it has: {', '.join(sorted(found))}"
            )

    def close(self) -> None:
        """Drop this connector's temp views; the shared session stays up for the process."""
        for name in [
            t.name for t in self._session.catalog.listTables() if t.name.startswith(f"dpgateway_{self.hooks.prefix}_")
        ]:
            self._session.catalog.dropTempView(name)


def _plain(value: Any) -> Any:
    """DECIMAL results as Python ints when integral, as DuckDB returns them."""
    if isinstance(value, Decimal):
        return int(value) if value.is_finite() and value == value.to_integral_value() else float(value)
    return value
