# Stage 'evaluate': rules are added by its issue.
