"""Converters: one module per source dataset, named after it (``unified-vl data convert SOURCE``).

Each module defines ``DESCRIPTION``, ``INPUTS`` and ``records(inputs, images, *, report, split)``;
`data_tools.converters._common.convert` runs any of them. Adding a source is adding one file.
"""

from data_tools.converters._common import ConversionError, Report, available_sources, convert, get_converter

__all__ = ["ConversionError", "Report", "available_sources", "convert", "get_converter"]
