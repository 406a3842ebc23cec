"""The one-line helpers every refusal and log line uses."""

from seg.errors import first_line


def test_first_line_quotes_the_first_line_escaped_or_the_type():
    assert first_line(ValueError("  bad header\nTraceback detail\n")) == "bad header"
    assert first_line(OSError("tab\there \x1b[31m")) == "tab\\there \\x1b[31m"
    assert first_line(KeyError()) == "KeyError"
    assert first_line(RuntimeError("   \n ")) == "RuntimeError"
