"""pgjdbc (Debian's libpostgresql-jdbc-java) against the gateway: DatabaseMetaData through the shadow catalog,
then a DP query with a bound parameter. The Java program is compiled into tmp_path by the test."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import PASSWORD, Running

JAR = Path("/usr/share/java/postgresql.jar")

PROGRAM = r"""
import java.sql.*;
import java.util.*;

public class Probe {
    static String column(ResultSet rs, String name) throws SQLException {
        List<String> out = new ArrayList<>();
        while (rs.next()) out.add(rs.getString(name));
        return String.join(",", out);
    }

    public static void main(String[] args) throws Exception {
        Properties props = new Properties();
        props.setProperty("user", "alice");
        props.setProperty("password", args[1]);
        try (Connection conn = DriverManager.getConnection(args[0], props)) {
            DatabaseMetaData meta = conn.getMetaData();
            System.out.println("tables=" + column(meta.getTables(null, "public", "%", new String[] {"TABLE"}), "TABLE_NAME"));
            System.out.println("columns=" + column(meta.getColumns(null, "public", "pums", "%"), "COLUMN_NAME"));
            System.out.println("types=" + column(meta.getColumns(null, "public", "pums", "income"), "TYPE_NAME"));
            System.out.println("schemas=" + column(meta.getSchemas(), "TABLE_SCHEM"));
            System.out.println("catalogs=" + column(meta.getCatalogs(), "TABLE_CAT"));
            System.out.println("primarykeys=" + column(meta.getPrimaryKeys(null, "public", "pums"), "COLUMN_NAME"));
            ResultSet typeInfo = meta.getTypeInfo();
            int typeCount = 0;
            while (typeInfo.next()) typeCount++;
            System.out.println("typeinfo=" + (typeCount > 10));
            try (PreparedStatement st = conn.prepareStatement("SELECT COUNT(*) AS n FROM pums WHERE age > ?")) {
                st.setInt(1, 30);
                try (ResultSet rs = st.executeQuery()) {
                    rs.next();
                    System.out.println("count=" + rs.getMetaData().getColumnTypeName(1) + ":" + (rs.getLong(1) >= 0));
                    SQLWarning notice = st.getWarnings();
                    System.out.println("notice=" + (notice != null && notice.getMessage().contains("dp: spent")));
                }
            }
            try (Statement st = conn.createStatement()) {
                st.executeQuery("SELECT * FROM pums");
                System.out.println("refused=false");
            } catch (SQLException e) {
                System.out.println("refused=" + e.getSQLState());
            }
        }
    }
}
"""


def _tools() -> tuple[str, str]:
    java, javac = shutil.which("java"), shutil.which("javac")
    if java is None or javac is None or not JAR.is_file():
        missing = "java/javac (openjdk-17-jdk-headless)" if java is None or javac is None else str(JAR)
        if os.environ.get("CI"):
            pytest.fail(f"{missing} is missing in CI: install default-jdk-headless and libpostgresql-jdbc-java")
        pytest.skip(f"{missing} is not installed (apt-get install -y libpostgresql-jdbc-java)")
    return java, javac


@pytest.mark.slow
def test_jdbc_metadata_and_a_dp_query(catalog_wire: Running, tmp_path: Path) -> None:
    java, javac = _tools()
    (tmp_path / "Probe.java").write_text(PROGRAM)
    subprocess.run([javac, "-cp", str(JAR), "-d", str(tmp_path), str(tmp_path / "Probe.java")], check=True, timeout=120)
    url = f"jdbc:postgresql://{catalog_wire.host}:{catalog_wire.port}/dpgateway"
    done = subprocess.run(
        [java, "-cp", f"{JAR}{os.pathsep}{tmp_path}", "Probe", url, PASSWORD],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = dict(line.split("=", 1) for line in done.stdout.splitlines())
    assert lines == {
        "tables": "pums",
        "columns": "pid,age,income,sex,married,educ,race",
        "types": "float8",
        "schemas": "information_schema,pg_catalog,public",
        "catalogs": "dpgateway",
        "primarykeys": "",
        "typeinfo": "true",
        "count": "int8:true",
        "notice": "true",
        "refused": "42501",
    }
