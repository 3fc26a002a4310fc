"""Presentation: tables, report files, figures and HTML pages rendered from results."""
