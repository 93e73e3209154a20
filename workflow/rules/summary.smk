# Stage 'summary': rules are added by its issue.
