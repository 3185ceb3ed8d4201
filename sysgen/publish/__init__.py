"""What a finished run is published as: the report and its plots, the dataset card, the export."""
