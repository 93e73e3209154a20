# Stage 'publish': rules are added by its issue.
