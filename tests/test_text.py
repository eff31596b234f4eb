"""Go's text layout: our tabwriter against Go's own text/tabwriter."""

from __future__ import annotations

import gc
import json
import subprocess
from pathlib import Path

import pytest

from asgi_pprof.text import tabwrite
from tests.conftest import go_binary

GO_TABWRITER = """package main

import (
\t"encoding/json"
\t"os"
\t"text/tabwriter"
)

func main() {
\tvar inputs []string
\tjson.NewDecoder(os.Stdin).Decode(&inputs)
\tvar outs []string
\tfor _, in := range inputs {
\t\tvar b strings
\t\tw := tabwriter.NewWriter(&b, 1, 8, 1, '\\t', 0)
\t\tw.Write([]byte(in))
\t\tw.Flush()
\t\touts = append(outs, string(b))
\t}
\tjson.NewEncoder(os.Stdout).Encode(outs)
}

type strings []byte

func (s *strings) Write(p []byte) (int, error) { *s = append(*s, p...); return len(p), nil }
"""

INPUTS = [
    "#\t0x67584a\truntime/pprof.StartCPUProfile+0xfe\t/src/pprof.go:782\n"
    "#\t0x672a7d\tnet/http/pprof.Profile+0x29d\t/src/net/http/pprof/pprof.go:136\n",
    "1 @ 0x1 0x2\n#\t0x1\ta+0x1\tf.py:1\n#\t0x2\tmodule.Class.long_method_name+0x2a\tf.py:42\n\n",
    "a\tb\tc\nxx\tyyyyyyyyyyyyyy\tz\nno tabs here\nq\tr\n",
    "\t\tx\n\ty\n",
    "héllo\twörld\tend\nab\tcd\tef\n",
    "",
    "trailing\tcell no newline",
]


@pytest.mark.go
def test_tabwrite_matches_go(tmp_path: Path) -> None:
    go = go_binary()
    assert go is not None
    src = tmp_path / "main.go"
    src.write_text(GO_TABWRITER)
    out = subprocess.run(
        [go, "run", str(src)],
        input=json.dumps(INPUTS),
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
        env={"HOME": str(tmp_path), "GOCACHE": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin"},
    )
    expected = json.loads(out.stdout)
    for text, want in zip(INPUTS, expected, strict=True):
        assert tabwrite(text) == want, text


def test_tabwrite_leaves_nothing_for_the_collector() -> None:
    # Recursive closures are reference cycles: each call left ~15 objects that only a
    # collection frees (450 000 after one big heap text: a 200-300 ms collection).
    gc.collect()
    gc.disable()
    try:
        for i in range(200):
            tabwrite(f"#\t0x{i:x}\tf{i}+0x1\tfile.py:{i}\n#\t0x1\tg+0x2\tother.py:1\n")
        left = gc.collect()
    finally:
        gc.enable()
    assert left == 0
