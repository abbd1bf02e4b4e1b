"""Rendering: the Rich reports and the JSON payloads of every command, read from one result object each."""
