"""Fast-weight snapshots (SPEC §5.0, §5.3); `ttt_cli.state` is their stable public API."""
