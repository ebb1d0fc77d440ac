"""merge, extract and convert tools with sd-scripts' names and flags."""
