"""The HTTP listener: metrics, the admin API and page, the exemption form, self-service pages."""
