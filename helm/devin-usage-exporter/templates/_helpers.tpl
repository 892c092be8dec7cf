{{/*
The chart name, or nameOverride.
*/}}
{{- define "devin-usage-exporter.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The full name of every resource: fullnameOverride, else <release>-<name> (or <release> alone when it
already contains the name). Truncated to 63 characters, the DNS label limit.
*/}}
{{- define "devin-usage-exporter.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Chart name and version, for the helm.sh/chart label.
*/}}
{{- define "devin-usage-exporter.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Selector labels: name and instance only. A selector is immutable, so nothing that changes on an
upgrade (version, chart) may be in it.
*/}}
{{- define "devin-usage-exporter.selectorLabels" -}}
app.kubernetes.io/name: {{ include "devin-usage-exporter.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Labels on every object.
*/}}
{{- define "devin-usage-exporter.labels" -}}
helm.sh/chart: {{ include "devin-usage-exporter.chart" . }}
{{ include "devin-usage-exporter.selectorLabels" . }}
app.kubernetes.io/version: {{ include "devin-usage-exporter.imageTag" . | quote }}
app.kubernetes.io/component: exporter
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/*
The image tag: image.tag, else the chart's appVersion.
*/}}
{{- define "devin-usage-exporter.imageTag" -}}
{{- .Values.image.tag | default .Chart.AppVersion | toString | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The ServiceAccount the pod runs as.
*/}}
{{- define "devin-usage-exporter.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "devin-usage-exporter.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The Secret holding the API key: the one the chart creates from apiKey, or existingSecret.name.
Fails the render when neither or both are set.
*/}}
{{- define "devin-usage-exporter.secretName" -}}
{{- if and .Values.apiKey .Values.existingSecret.name }}
{{- fail "devin-usage-exporter: set either apiKey or existingSecret.name, not both" }}
{{- else if .Values.apiKey }}
{{- include "devin-usage-exporter.fullname" . }}
{{- else if .Values.existingSecret.name }}
{{- .Values.existingSecret.name }}
{{- else }}
{{- fail "devin-usage-exporter: the Devin API key is not set. Set apiKey (the chart creates a Secret) or existingSecret.name (a Secret in the release namespace holding the key under existingSecret.key, default \"api-key\")" }}
{{- end }}
{{- end }}

{{/*
The container port: the port of config.server.listen.
*/}}
{{- define "devin-usage-exporter.containerPort" -}}
{{- $listen := dig "server" "listen" "0.0.0.0:9877" (.Values.config | default dict) | toString }}
{{- $port := regexFind "[0-9]+$" $listen }}
{{- if not $port }}
{{- fail (printf "devin-usage-exporter: config.server.listen %q is not HOST:PORT" $listen) }}
{{- end }}
{{- $port }}
{{- end }}

{{/*
Where the ConfigMap is mounted, and the config file the exporter reads.
*/}}
{{- define "devin-usage-exporter.configDir" -}}
/etc/devin-usage-exporter
{{- end }}

{{/*
The exporter config file: .Values.config with api.api_key pointing at the DEVIN_API_KEY variable,
which the exporter expands at start-up; the key itself never enters the ConfigMap.
*/}}
{{- define "devin-usage-exporter.config" -}}
{{- $config := deepCopy (.Values.config | default dict) }}
{{- $api := deepCopy (get $config "api" | default dict) }}
{{- $_ := set $api "api_key" "${DEVIN_API_KEY}" }}
{{- $_ := set $config "api" $api }}
{{- toYaml $config }}
{{- end }}
