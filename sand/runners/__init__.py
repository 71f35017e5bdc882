"""The stage runners, one module per stage so that each stage's code version covers only the code it runs
(sand.stages is their public face)."""
