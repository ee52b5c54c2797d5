"""The `maria` command's machinery: reading its input, printing its results, one function per command."""
