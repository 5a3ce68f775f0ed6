"""What the experiment scripts share: prompt sets, provenance-stamped JSON, plots."""
